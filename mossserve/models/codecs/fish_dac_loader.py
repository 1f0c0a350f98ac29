"""Strict loading of the S2 Pro codec from a Fish model directory (fixture README 2.5).

`codec.safetensors` when present, else `codec.pth` through `torch.load(weights_only=True)` (no
arbitrary pickle); `codec_config.json` beside it when present, else the published codec's
hyper-parameters. The `.pth` may be flat, nested under `state_dict`, or `generator.`-prefixed
(the reference accepts all three). Weight norm comes in two spellings, both folded here to one
weight `g · v / ‖v‖`: `<m>.parametrizations.weight.original0/1` and the legacy
`<m>.weight_g/weight_v`. The transformers' `w1`/`w3` fill the fused SwiGLU, and each head's q/k
rows are reordered for the shared rotate-half RoPE. Unlike the reference (strict=False), every
tensor must be consumed and every parameter filled: anything missing, unexpected, doubled or
mis-shaped is a CheckpointError that names it. The one exception is the transformers' derived
buffers (`freqs_cis`, the bool `causal_mask`, KV caches), which fish-speech saved as persistent
buffers until mid-2025 and so may sit in a published `codec.pth`: the reference recomputes them
(its load skips them as unexpected), and so does this codec.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import CheckpointError
from ...layers.rotary_rounded import permute_heads
from ...loader import build_on_meta, require_float, resolve_model_dir
from ..config_utils import read_json
from .fish_dac import FishDac
from .fish_dac_config import FishDacConfig
from .fish_dac_modules import fold_weight_norm
from .fish_dac_transformer import Attention

CODEC_FILES = ("codec.safetensors", "codec.pth")
CONFIG_FILE = "codec_config.json"
_WEIGHT_NORM = re.compile(r"^(.*)\.(?:parametrizations\.weight\.original([01])|weight_([gv]))$")
_FEED_FORWARD = re.compile(r"^(.*\.feed_forward)\.(w[123])\.weight$")
DERIVED_BUFFERS = ("freqs_cis", "causal_mask", "k_cache", "v_cache")


def is_fish_codec_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in CODEC_FILES)


def load_fish_dac(name_or_path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> FishDac:
    directory = resolve_model_dir(name_or_path, allow_patterns=[*CODEC_FILES, CONFIG_FILE])
    return load_fish_dac_file(codec_file(directory), device, dtype)


def load_fish_dac_file(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> FishDac:
    """One codec weight file (.safetensors or .pth), with the codec_config.json beside it if any."""
    config_path = path.parent / CONFIG_FILE
    config = FishDacConfig.from_dict(read_json(config_path), str(config_path)) if config_path.is_file() else FishDacConfig()
    tensors = read_tensors(path)
    if torch.device(device).type == "cuda":
        # cuDNN runs float32 convolutions in TF32 by default: the encoder then misses the reference's
        # latents (6e-3 against 5e-5) and codes. A process-wide flag: the MOSS codec needs none.
        torch.backends.cudnn.allow_tf32 = False
    model = build_on_meta(lambda: FishDac(config), dtype or torch.float32, device)
    load_state(model, tensors, path)
    return model.eval().requires_grad_(False)


def codec_file(directory: Path) -> Path:
    for name in CODEC_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no codec weights ({' or '.join(CODEC_FILES)})")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor of a codec weight file, unwrapped as the reference unwraps it."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, RecursionError):  # not the file's fault
        raise
    except Exception as e:  # a damaged file fails in many ways (a legacy .pth's dangling storage key: KeyError)
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # torch's CPU allocator: no damage
            raise
        first_line = (str(e).splitlines() or [""])[0] or ("the file ends early" if isinstance(e, EOFError) else "")
        raise CheckpointError(f"{path}: cannot read codec weights ({type(e).__name__}: {first_line})") from None
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    if any(str(k).startswith("generator.") for k in tensors):
        tensors = {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
    tensors = {k: v for k, v in tensors.items() if not (isinstance(k, str) and k.rsplit(".", 1)[-1] in DERIVED_BUFFERS)}
    for name, value in tensors.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            raise CheckpointError(f"{path}: entry {name!r} is not a named tensor")
        require_float(path, name, value.dtype)
    return tensors


def load_state(model: FishDac, tensors: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unexpected = []
    for name, tensor in tensors.items():
        target, part = _target(name)
        if target not in params:
            unexpected.append(name)
            continue
        parts = groups.setdefault(target, {})
        if part in parts:
            raise CheckpointError(f"{source}: tensors {parts[part][0]} and {name} fill the same parameter")
        parts[part] = (name, tensor)
    missing = [n for target in params for n in _missing(target, groups.get(target, {}))]
    if missing or unexpected:
        found = [f"missing {len(missing)} tensor(s): {_few(missing)}"] if missing else []
        found += [f"unexpected {len(unexpected)} tensor(s): {_few(sorted(unexpected))}"] if unexpected else []
        raise CheckpointError(f"{source}: codec weights do not match the codec config: " + "; ".join(found))
    heads = {f"{name}.wqkv.weight": (m.heads, m.head_dim) for name, m in model.named_modules() if isinstance(m, Attention)}
    with torch.no_grad():
        for target, param in params.items():
            parts = groups[target]
            value = _combine(parts)
            if tuple(value.shape) != tuple(param.shape):
                spelled = " + ".join(name for name, _ in parts.values())
                raise CheckpointError(f"{source}: tensor {spelled} gives shape {list(value.shape)}, "
                                      f"expected {list(param.shape)}")
            if target in heads:  # q and k rows of each head: interleaved pairs -> rotate-half order
                h, d = heads[target]
                q, k, v = value.split(h * d)
                value = torch.cat([permute_heads(q, h, d), permute_heads(k, h, d), v])
            param.copy_(value)


def _target(name: str) -> tuple[str, str]:
    """Checkpoint name -> (our parameter, which part of it)."""
    m = _WEIGHT_NORM.match(name)
    if m:
        return f"{m[1]}.weight", "g" if (m[2] or m[3]) in ("0", "g") else "v"
    m = _FEED_FORWARD.match(name)
    if m:
        return (f"{m[1]}.down_proj.weight", "plain") if m[2] == "w2" else (f"{m[1]}.gate_up_proj.weight", m[2])
    return name, "plain"


def _missing(target: str, parts: dict[str, tuple[str, torch.Tensor]]) -> list[str]:
    """Checkpoint names a parameter still lacks, spelled as the file would spell them."""
    if target.endswith(".gate_up_proj.weight"):
        prefix = target.removesuffix(".gate_up_proj.weight")
        return [f"{prefix}.{w}.weight" for w in ("w1", "w3") if w not in parts]
    if target.endswith(".down_proj.weight"):
        return [] if parts else [target.removesuffix(".down_proj.weight") + ".w2.weight"]
    if "plain" in parts:
        if len(parts) > 1:
            raise CheckpointError(f"{target} is given both plain and weight-normed: "
                                  + ", ".join(name for name, _ in parts.values()))
        return []
    if not parts:
        return [target]
    if set(parts) != {"g"} and set(parts) != {"v"}:
        return []
    (name, _), = parts.values()
    legacy = name.endswith(("weight_g", "weight_v"))
    prefix = target.removesuffix(".weight")
    want = {"g": ".weight_g" if legacy else ".parametrizations.weight.original0",
            "v": ".weight_v" if legacy else ".parametrizations.weight.original1"}
    return [prefix + want[p] for p in ("g", "v") if p not in parts]


def _combine(parts: dict[str, tuple[str, torch.Tensor]]) -> torch.Tensor:
    if "plain" in parts:
        return parts["plain"][1]
    if "g" in parts:
        (g_name, g), (v_name, v) = parts["g"], parts["v"]
        if v.dim() < 2 or g.numel() != v.shape[0]:
            raise CheckpointError(f"{g_name} has shape {list(g.shape)} and {v_name} {list(v.shape)}: one gain per "
                                  "row of a weight of 2 or more dimensions expected")
        return fold_weight_norm(g.reshape(-1, *[1] * (v.dim() - 1)), v)
    (w1_name, w1), (w3_name, w3) = parts["w1"], parts["w3"]
    if w1.dim() != 2 or w1.shape != w3.shape:
        raise CheckpointError(f"{w1_name} {list(w1.shape)} and {w3_name} {list(w3.shape)}: two matrices of one "
                              "shape expected (the gate and up projections)")
    return torch.cat([w1, w3])


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
