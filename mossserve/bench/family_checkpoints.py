"""Bench-size random MOSS-TTS-Local and MOSS-TTS-Realtime checkpoints in the published on-disk format.

Like the Delay bench checkpoint (checkpoint.py): config.json, model.safetensors with the published
tensor names and shapes (tests/fixtures/moss_tts_local/README.md section 1.2,
tests/fixtures/moss_tts_realtime/README.md section 1.2), the tokenizer files, and a bench-size
random codec in `codec/`; weights N(0, 0.02) (norm gains 1 + 0.02 N) from one seeded generator in
sorted name order, so every build is byte-identical. They load through the real loader.

Bench size scales the 1.7B models down (hidden 2048 -> 512, 28 -> 8 layers, the MLPs and heads
alike) and keeps the depth transformers' share of the parameters:

* Local: backbone as Delay's bench size; depth transformer 1 layer (4 of 28 layers' worth),
  hidden 384 (1536 / 4), MLP 2240 (8960 / 4), bridge MLPs 512 (2048 / 4); heads from the backbone.
* Realtime: backbone as Delay's; local transformer hidden 512 (must equal the backbone's),
  1 layer, MLP 1536, 8 / 4 heads of 64.

Weight edits so that greedy decoding never stops (the opposite of the fixtures' weight surgery):

* Local: the text channel always picks `<|audio_assistant_gen_slot|>`, never `<|audio_end|>`. Four
  units of the channel-0 bridge MLP Q_0 have equal gate and up rows, so their SwiGLU output
  g * silu(g) = g^2 sigmoid(g) is never negative, and only they write output dim 0 (gain 100;
  nothing else does), so dim 0 dominates the head norm's output and is positive. Text head
  column 0 is zero except +1 for the gen slot: its logit is ~sqrt(hidden) while every other
  token's is ~0.
* Realtime: rows 1024..1026 (pad, BOS, EOS) of every local head are zero, so codebook 0 never
  picks EOS (1026) while the 1024 real codes have random logits (their maximum is positive);
  row 1024 of the backbone audio tables is zero, as the published files hold it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import codec as codec_bench
from .checkpoint import (
    TOKENIZER_FILES,
    delay_config,
    demo_dir,
    qwen3_layer_shapes,
    random_tensors,
)

LOCAL_BENCH_SIZE = {"hidden": 512, "layers": 8, "intermediate": 1536, "heads": 8, "kv_heads": 4, "head_dim": 64,
                    "n_vq": 32, "local_hidden": 384, "local_ffn": 2240, "local_layers": 1, "bridge_ffn": 512}
REALTIME_BENCH_SIZE = {"hidden": 512, "layers": 8, "intermediate": 1536, "heads": 8, "kv_heads": 4, "head_dim": 64,
                       "local_intermediate": 1536, "local_layers": 1, "local_heads": 8, "local_kv_heads": 4,
                       "local_head_dim": 64}
POSITIVE_UNITS, POSITIVE_GAIN = 4, 100.0  # Local: the Q_0 units that write text-head input dim 0

# Realtime's added tokens are Qwen3's names where MOSS-TTS renamed them (151654/151655 are the
# Realtime ones); the vocabulary and merges are the same as the demo tokenizer's.
REALTIME_TOKEN_NAMES = {151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|audio_pad|>",
                        151655: "<|text_pad|>", 151656: "<|video_pad|>", 151662: "<|fim_pad|>"}


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer: dict[str, str],
           codec_config: dict | None, seed: int, family: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: t.contiguous() for k, t in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    for name, text in tokenizer.items():
        (directory / name).write_text(text, encoding="utf-8")
    codec_bench.write_random_checkpoint(directory / "codec", codec_config or codec_bench.bench_config(), seed)
    (directory / "README.md").write_text(
        f"Random-weight MOSS-TTS-{family} checkpoint for `mossserve bench` (noise, not speech); "
        "built by mossserve/bench/family_checkpoints.py.\n")
    return directory


def _demo_tokenizer() -> dict[str, str]:
    return {name: (demo_dir() / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}


# ---- Local ---------------------------------------------------------------------------------------
def local_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, n_vq: int,
                 local_hidden: int, local_ffn: int, local_layers: int, bridge_ffn: int) -> dict:
    """The Delay demo's config.json resized, plus the depth-transformer fields (upstream's Local config)."""
    config = delay_config(hidden, layers, intermediate, heads, kv_heads, head_dim, n_vq)
    config.update(local_hidden_size=local_hidden, local_ffn_hidden_size=local_ffn, local_num_layers=local_layers,
                  additional_mlp_ffn_hidden_size=bridge_ffn)
    return config


def local_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    lang = config["language_config"]
    h, vocab, n_vq = lang["hidden_size"], lang["vocab_size"], config["n_vq"]
    q, kv, d = lang["num_attention_heads"], lang["num_key_value_heads"], lang["head_dim"]
    hl, f, codes = config["local_hidden_size"], config["additional_mlp_ffn_hidden_size"], config["audio_vocab_size"] + 1
    shapes = qwen3_layer_shapes("model.language_model.", lang["num_hidden_layers"], h, lang["intermediate_size"], q, kv, d)
    shapes.update(qwen3_layer_shapes("local_transformer.", config["local_num_layers"], hl, config["local_ffn_hidden_size"],
                                q, kv, d))
    shapes.update({
        "model.language_model.embed_tokens.weight": (vocab, h),
        "model.language_model.norm.weight": (h,),
        "model.embedding_list.0.weight": (vocab, h),
        "lm_heads.0.weight": (vocab, h),
        "local_transformer.norm.weight": (hl,),
        "speech_embedding_to_local_mlp.gate_proj.weight": (f, h),
        "speech_embedding_to_local_mlp.up_proj.weight": (f, h),
        "speech_embedding_to_local_mlp.down_proj.weight": (hl, f),
    })
    for j in range(1, n_vq + 1):
        shapes[f"model.embedding_list.{j}.weight"] = (codes, h)
        shapes[f"lm_heads.{j}.weight"] = (codes, h)
    for c in range(n_vq + 1):
        p = f"local_to_speech_embedding_mlps.{c}."
        shapes.update({p + "gate_proj.weight": (f, hl), p + "up_proj.weight": (f, hl), p + "down_proj.weight": (h, f)})
        shapes[f"layer_norm_before_lm_heads.{c}.weight"] = (h,)
    return shapes


def local_random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = random_tensors(local_tensor_shapes(config), seed, unit_gain=lambda name: name.endswith("norm.weight")
                             or name.startswith("layer_norm_before_lm_heads."))
    gate = tensors["local_to_speech_embedding_mlps.0.gate_proj.weight"]
    up = tensors["local_to_speech_embedding_mlps.0.up_proj.weight"]
    down = tensors["local_to_speech_embedding_mlps.0.down_proj.weight"]
    up[:POSITIVE_UNITS] = gate[:POSITIVE_UNITS]  # g * silu(g) >= 0
    down[0] = 0.0
    down[:, :POSITIVE_UNITS] = 0.0
    down[0, :POSITIVE_UNITS] = POSITIVE_GAIN
    tensors["layer_norm_before_lm_heads.0.weight"][0] = 1.0
    text_head = tensors["lm_heads.0.weight"]
    text_head[:, 0] = 0.0
    text_head[config["audio_assistant_gen_slot_token_id"], 0] = 1.0
    return tensors


def build_local_checkpoint(directory: str | Path, *, seed: int = 0, codec_config: dict | None = None,
                           **sizes) -> Path:
    """Write a random Local checkpoint directory (config, weights, tokenizer, codec/); returns it."""
    config = local_config(**{**LOCAL_BENCH_SIZE, **sizes})
    return _write(Path(directory), config, local_random_weights(config, seed), _demo_tokenizer(), codec_config, seed,
                  "Local-Transformer")


# ---- Realtime ------------------------------------------------------------------------------------
def realtime_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                    local_intermediate: int, local_layers: int, local_heads: int, local_kv_heads: int,
                    local_head_dim: int) -> dict:
    """Upstream's `MossTTSRealtimeConfig` as saved (fixture layout), resized."""
    language = delay_config(hidden, layers, intermediate, heads, kv_heads, head_dim, 32)["language_config"]
    language.update(bos_token_id=151643, eos_token_id=151645)
    local = {
        "attention_bias": False, "attention_dropout": 0.0, "audio_pad_token": 1024, "audio_vocab_size": 1027,
        "head_dim": local_head_dim, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": local_intermediate, "max_position_embeddings": 33,
        "model_type": "moss_tts_realtime_local_transformer", "num_attention_heads": local_heads,
        "num_hidden_layers": local_layers, "num_key_value_heads": local_kv_heads, "pad_token_id": 1024,
        "rms_norm_eps": 1e-06, "rope_parameters": {"factor": 1.0, "rope_theta": 1000000, "rope_type": "linear"},
        "rope_theta": 1000000, "rope_type": "linear", "rvq": 16, "use_cache": True,
    }
    return {"architectures": ["MossTTSRealtime"], "audio_pad_token": 1024, "audio_vocab_size": 1027,
            "dtype": "float32", "initializer_range": 0.02, "language_config": language, "local_config": local,
            "model_type": "moss_tts_realtime", "reference_audio_pad": 151654, "rvq": 16, "text_pad": 151655}


def realtime_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    lang, local = config["language_config"], config["local_config"]
    h, vocab, codes, rvq = lang["hidden_size"], lang["vocab_size"], config["audio_vocab_size"], config["rvq"]
    shapes = qwen3_layer_shapes("language_model.", lang["num_hidden_layers"], h, lang["intermediate_size"],
                           lang["num_attention_heads"], lang["num_key_value_heads"], lang["head_dim"])
    shapes.update(qwen3_layer_shapes("local_transformer.model.", local["num_hidden_layers"], local["hidden_size"],
                                local["intermediate_size"], local["num_attention_heads"],
                                local["num_key_value_heads"], local["head_dim"]))
    shapes.update({"embed_tokens.0.weight": (vocab, h), "language_model.embed_tokens.weight": (vocab, h),
                   "language_model.norm.weight": (h,), "local_transformer.model.norm.weight": (local["hidden_size"],)})
    for k in range(rvq):
        shapes[f"embed_tokens.{k + 1}.weight"] = (codes, h)
        shapes[f"local_transformer.local_lm_heads.{k}.weight"] = (codes, local["hidden_size"])
    for j in range(rvq - 1):
        shapes[f"local_transformer.model.embed_tokens.{j}.weight"] = (codes, local["hidden_size"])
    return shapes


def realtime_random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = random_tensors(realtime_tensor_shapes(config), seed)
    pad = config["audio_pad_token"]
    for name, t in tensors.items():
        if name.startswith("local_transformer.local_lm_heads."):
            t[pad:] = 0.0  # pad, BOS, EOS: never above the best real code
        elif name.startswith("embed_tokens.") and name != "embed_tokens.0.weight":
            t[pad] = 0.0
    return tensors


def realtime_tokenizer() -> dict[str, str]:
    """The demo tokenizer files with the Realtime names of the added tokens."""
    files = _demo_tokenizer()
    tokenizer = json.loads(files["tokenizer.json"])
    for token in tokenizer["added_tokens"]:
        token["content"] = REALTIME_TOKEN_NAMES.get(token["id"], token["content"])
    config = json.loads(files["tokenizer_config.json"])
    for key, token in config.get("added_tokens_decoder", {}).items():
        token["content"] = REALTIME_TOKEN_NAMES.get(int(key), token["content"])
    names = set(REALTIME_TOKEN_NAMES.values())
    config["additional_special_tokens"] = [t for t in config.get("additional_special_tokens", [])
                                           if t.startswith("<|im_") or t in names]
    out = {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
           "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
    if "special_tokens_map.json" in files:
        special = json.loads(files["special_tokens_map.json"])
        special.pop("additional_special_tokens", None)
        out["special_tokens_map.json"] = json.dumps(special, indent=2, ensure_ascii=False)
    return out


def build_realtime_checkpoint(directory: str | Path, *, seed: int = 0, codec_config: dict | None = None,
                              **sizes) -> Path:
    """Write a random Realtime checkpoint directory (config, weights, tokenizer, codec/); returns it."""
    config = realtime_config(**{**REALTIME_BENCH_SIZE, **sizes})
    return _write(Path(directory), config, realtime_random_weights(config, seed), realtime_tokenizer(), codec_config,
                  seed, "Realtime")
