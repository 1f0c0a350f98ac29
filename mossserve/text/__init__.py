"""Text layer: tokenizer loading, the TTS text normalizer and the per-family prompt builders."""
