"""Audio codecs behind one seam (base.Codec): MOSS-Audio-Tokenizer, and Fish's modded DAC (fish_dac)."""
from .base import Codec, StreamingDecoder
from .moss_audio_tokenizer import DecodeOutput, EncodeOutput, MossAudioTokenizer
from .moss_audio_tokenizer_config import MossAudioTokenizerConfig
from .moss_streaming import MossStreamingDecoder

__all__ = [
    "Codec",
    "DecodeOutput",
    "EncodeOutput",
    "MossAudioTokenizer",
    "MossAudioTokenizerConfig",
    "MossStreamingDecoder",
    "StreamingDecoder",
]
