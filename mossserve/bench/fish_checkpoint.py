"""A bench-size random Fish S2 Pro checkpoint in the published directory layout.

config.json (`fish_qwen3_omni`), model.safetensors with the published tensor names
(tests/fixtures/fish_s2_pro/README.md section 2.3), the tokenizer (the demo's Qwen BPE and Qwen3's added
tokens, plus the Fish tokens at their S2 Pro ids: `<|pad|>` .. `<|audio_pad|>`, then `<|semantic:0..4095|>`), and the
codec beside it as `codec.safetensors` + `codec_config.json`. Weights come from one seeded
generator in sorted name order, so every build is byte-identical; they load through the real loaders.

Bench size scales S2 Pro down like the other families (slow AR hidden 2560 -> 512, 36 -> 8 layers,
heads 8 / 4 of 64, MLP 1536; fast AR 4 -> 1 layer of the same shapes; N = 10 codebooks of 4096 and
the full vocabulary kept). The codec keeps its rates and quantiser and shrinks its widths (latent
1024 -> 512, decoder 1536 -> 384, pre/post transformers 8 -> 2 layers of 8 heads).

Weight edit so that greedy decoding never stops: the `<|im_end|>` embedding row (the tied head's
row) is zero, so its logit is 0 while the maximum of 4096 random semantic logits is positive.
The codec's weight-normed convolutions are stored folded (plain `.weight`), which the codec loader
accepts as well.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import TOKENIZER_FILES, demo_dir, random_tensors

FISH_BENCH_SIZE = {"hidden": 512, "layers": 8, "intermediate": 1536, "heads": 8, "kv_heads": 4, "head_dim": 64,
                   "fast_layers": 1, "codebooks": 10, "codebook_size": 4096}
FISH_TOKENS = ("<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>", "<|voice|>", "<|interleave|>",
               "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")
SEMANTIC_TOKENS = 4096
# Qwen3's names of the ids MOSS-TTS renamed in the demo tokenizer (S2 Pro keeps Qwen3's, and two of
# MOSS's names are Fish token names).
QWEN3_NAMES = {151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
               151656: "<|video_pad|>", 151662: "<|fim_pad|>"}


def fish_tokenizer() -> dict[str, str]:
    """The demo tokenizer with the Fish added tokens appended in S2 Pro's order."""
    files = {name: (demo_dir() / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}
    tokenizer = json.loads(files["tokenizer.json"])
    added = tokenizer["added_tokens"]
    for token in added:
        token["content"] = QWEN3_NAMES.get(token["id"], token["content"])
    next_id = max(t["id"] for t in added) + 1
    for name in (*FISH_TOKENS, *(f"<|semantic:{i}|>" for i in range(SEMANTIC_TOKENS))):
        added.append({"id": next_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
        next_id += 1
    files["tokenizer.json"] = json.dumps(tokenizer, ensure_ascii=False)
    return files


def fish_config(tokenizer: dict, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                head_dim: int, fast_layers: int, codebooks: int, codebook_size: int) -> dict:
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab = 256 * -(-(max(ids.values()) + 1) // 256)  # rounded up, as the published embedding is
    shapes = {"dim": hidden, "n_head": heads, "n_local_heads": kv_heads, "head_dim": head_dim,
              "intermediate_size": intermediate}
    return {
        "model_type": "fish_qwen3_omni", "dtype": "float32",
        "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|pad|>"], "audio_pad_token_id": ids["<|audio_pad|>"],
        "semantic_start_token_id": ids["<|semantic:0|>"],
        "semantic_end_token_id": ids[f"<|semantic:{SEMANTIC_TOKENS - 1}|>"],
        "text_config": {"model_type": "fish_qwen3", "vocab_size": vocab, "n_layer": layers, **shapes,
                        "rope_base": 1000000.0, "norm_eps": 1e-6, "max_seq_len": 32768, "tie_word_embeddings": True,
                        "attention_qk_norm": True},
        "audio_decoder_config": {"model_type": "fish_qwen3_audio_decoder", "vocab_size": codebook_size,
                                 "num_codebooks": codebooks, "n_layer": fast_layers, **shapes,
                                 "attention_qk_norm": False},
    }


def fish_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    text, audio = config["text_config"], config["audio_decoder_config"]
    d, hd, i = text["dim"], text["head_dim"], text["intermediate_size"]
    qkv = (text["n_head"] + 2 * text["n_local_heads"]) * hd
    shapes = {
        "text_model.model.embeddings.weight": (text["vocab_size"], d),
        "text_model.model.norm.weight": (d,),
        "audio_decoder.codebook_embeddings.weight": (audio["num_codebooks"] * audio["vocab_size"], d),
        "audio_decoder.embeddings.weight": (audio["vocab_size"], d),
        "audio_decoder.norm.weight": (d,),
        "audio_decoder.output.weight": (audio["vocab_size"], d),
    }
    for prefix, layers, qk_norm in (("text_model.model.", text["n_layer"], True), ("audio_decoder.", audio["n_layer"], False)):
        for layer in range(layers):
            p = f"{prefix}layers.{layer}."
            shapes.update({
                p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                p + "attention.wqkv.weight": (qkv, d), p + "attention.wo.weight": (d, text["n_head"] * hd),
                p + "feed_forward.w1.weight": (i, d), p + "feed_forward.w3.weight": (i, d),
                p + "feed_forward.w2.weight": (d, i),
            })
            if qk_norm:
                shapes.update({p + "attention.q_norm.weight": (hd,), p + "attention.k_norm.weight": (hd,)})
    return shapes


def fish_random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = random_tensors(fish_tensor_shapes(config), seed)
    tensors["text_model.model.embeddings.weight"][config["eos_token_id"]] = 0.0  # never stops (module docstring)
    return tensors


FISH_CODEC_BENCH_SIZE = {"encoder_dim": 32, "decoder_dim": 384, "layers": 2, "heads": 8, "head_dim": 64,
                         "intermediate": 1536, "window": 128}


def fish_codec_config(encoder_dim: int, decoder_dim: int, layers: int, heads: int, head_dim: int, intermediate: int,
                      window: int) -> dict:
    """codec_config.json (upstream's nesting); the pre/post transformers run at the latent width."""
    latent = encoder_dim * 16

    def window_transformer() -> dict:
        return {"causal": True, "window_size": window, "input_dim": latent,
                "config": {"n_layer": layers, "n_head": heads, "dim": latent, "intermediate_size": intermediate,
                           "n_local_heads": -1, "head_dim": head_dim, "rope_base": 10000, "norm_eps": 1e-5}}

    return {"sample_rate": 44100, "encoder_dim": encoder_dim, "encoder_rates": [2, 4, 8, 8], "decoder_dim": decoder_dim,
            "decoder_rates": [8, 8, 4, 2], "encoder_transformer_layers": [0, 0, 0, 1],
            "transformer_general_config": {"head_dim": 64, "rope_base": 10000, "norm_eps": 1e-5},
            "quantizer": {"input_dim": latent, "n_codebooks": 9, "codebook_size": 1024, "codebook_dim": 8,
                          "downsample_factor": [2, 2], "semantic_codebook_size": 4096,
                          "pre_module": window_transformer(), "post_module": window_transformer()}}


def fish_codec_weights(codec_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random codec tensors: N(0, 1/fan_in) matrices and kernels, unit gains, snake alpha 1, zero biases,
    N(0, 1) codebooks; the fused SwiGLU weights written as the published w1 / w3 / w2."""
    from ..loader import build_on_meta
    from ..models.codecs.fish_dac import FishDac
    from ..models.codecs.fish_dac_config import FishDacConfig

    model = build_on_meta(lambda: FishDac(FishDacConfig.from_dict(codec_config, "bench codec")), torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, param in sorted(model.named_parameters()):
        if param.dim() == 1 or "alpha" in name:
            value = torch.zeros(param.shape) if name.endswith("bias") else torch.ones(param.shape)
        elif "codebook" in name:
            value = torch.randn(param.shape, generator=gen)
        else:
            fan_in = param[0].numel()
            value = torch.randn(param.shape, generator=gen) / fan_in ** 0.5
        if name.endswith(".gate_up_proj.weight"):
            prefix = name.removesuffix(".gate_up_proj.weight")
            tensors[f"{prefix}.w1.weight"], tensors[f"{prefix}.w3.weight"] = (t.contiguous() for t in value.chunk(2))
        elif name.endswith(".down_proj.weight") and "feed_forward" in name:
            tensors[name.removesuffix(".down_proj.weight") + ".w2.weight"] = value
        else:
            tensors[name] = value
    return tensors


def build_fish_checkpoint(directory: str | Path, *, seed: int = 0, codec_sizes: dict | None = None, **sizes) -> Path:
    """`sizes` override FISH_BENCH_SIZE, `codec_sizes` FISH_CODEC_BENCH_SIZE (tests build smaller ones)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = fish_tokenizer()
    config = fish_config(json.loads(files["tokenizer.json"]), **{**FISH_BENCH_SIZE, **sizes})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    save_file({k: t.contiguous() for k, t in fish_random_weights(config, seed).items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    codec_config = fish_codec_config(**{**FISH_CODEC_BENCH_SIZE, **(codec_sizes or {})})
    (directory / "codec_config.json").write_text(json.dumps(codec_config, indent=2) + "\n")
    save_file(fish_codec_weights(codec_config, seed), directory / "codec.safetensors", metadata={"format": "pt"})
    (directory / "README.md").write_text("Random-weight Fish S2 Pro checkpoint for `mossserve bench` (noise, not "
                                         "speech); built by mossserve/bench/fish_checkpoint.py.\n")
    return directory
