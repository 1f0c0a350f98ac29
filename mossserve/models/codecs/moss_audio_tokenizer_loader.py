"""Strict loading of a published MOSS-Audio-Tokenizer checkpoint, straight from safetensors.

Names are the published ones (spec 5.1): weight-normalised convs as
`<m>.parametrizations.weight.original0/1` (folded here to one weight), attention projections as
`self_attn.in_projs.0` / `out_projs.0` (older `in_proj_weight`, `in_proj.weight`,
`out_proj.weight` accepted). Every tensor must be consumed and every parameter filled; anything
missing, unexpected or mis-shaped is a CheckpointError that names it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ...errors import CheckpointError
from ...loader import build_on_meta, require_float, resolve_model_dir, weight_files
from ..config_utils import read_json
from .moss_audio_tokenizer import MossAudioTokenizer
from .moss_audio_tokenizer_config import MossAudioTokenizerConfig

_OLD_ATTENTION = [
    (re.compile(r"^(.*\.self_attn)\.(?:in_proj_weight|in_proj\.weight)$"), r"\1.in_projs.0.weight"),
    (re.compile(r"^(.*\.self_attn)\.out_proj\.weight$"), r"\1.out_projs.0.weight"),
]
_WN = ".parametrizations.weight.original"


@dataclass
class Slot:
    """Where one published tensor goes: `param` (or its row `index`), as-is or as g / v of a
    weight-normalised conv."""

    param: torch.Tensor
    index: int | None
    kind: str  # "plain", "g" (magnitude, (out, 1, 1)) or "v" (direction, (out, in, 1))

    @property
    def target(self) -> torch.Tensor:
        return self.param if self.index is None else self.param[self.index]

    @property
    def shape(self) -> tuple[int, ...]:
        out, *rest = self.target.shape
        return {"plain": (out, *rest), "g": (out, 1, 1), "v": (out, *rest, 1)}[self.kind]


def load_moss_audio_tokenizer(name_or_path: str | Path, device: str | torch.device = "cpu",
                              dtype: torch.dtype | None = None) -> MossAudioTokenizer:
    directory = resolve_model_dir(name_or_path, allow_patterns=["*.json", "*.safetensors"])
    config_path = directory / "config.json"
    config = MossAudioTokenizerConfig.from_dict(read_json(config_path), where=str(config_path))
    model = build_on_meta(lambda: MossAudioTokenizer(config), dtype or config.compute_dtype, device)
    model.quantizer.float()  # the quantizer always runs in fp32
    load_weights(model, directory)
    return model.eval().requires_grad_(False)


def checkpoint_layout(model: MossAudioTokenizer) -> dict[str, Slot]:
    """Published name -> slot, for every parameter of the model."""
    layout: dict[str, Slot] = {}
    for name, p in model.named_parameters():
        m = re.fullmatch(r"quantizer\.(in|out)_proj_(weight|bias)", name)
        if name == "quantizer.codebooks":
            for j in range(p.shape[0]):
                layout[f"quantizer.quantizers.{j}.codebook.weight"] = Slot(p, j, "plain")
        elif m:
            for j in range(p.shape[0]):
                prefix = f"quantizer.quantizers.{j}.{m[1]}_proj"
                if m[2] == "bias":
                    layout[f"{prefix}.bias"] = Slot(p, j, "plain")
                else:
                    layout[f"{prefix}{_WN}0"] = Slot(p, j, "g")
                    layout[f"{prefix}{_WN}1"] = Slot(p, j, "v")
        elif name in ("quantizer.input_proj.weight", "quantizer.output_proj.weight"):
            base = name.removesuffix(".weight")
            layout[f"{base}{_WN}0"] = Slot(p, None, "g")
            layout[f"{base}{_WN}1"] = Slot(p, None, "v")
        else:
            name = re.sub(r"\.self_attn\.(in|out)_proj\.weight$", r".self_attn.\1_projs.0.weight", name)
            layout[name] = Slot(p, None, "plain")
    return layout


def load_weights(model: MossAudioTokenizer, directory: Path) -> None:
    layout = checkpoint_layout(model)
    handles = _open_tensors(directory)  # published name -> (file handle, name in file)
    missing = sorted(set(layout) - set(handles))
    unexpected = sorted(set(handles) - set(layout))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_few(unexpected)}")
        raise CheckpointError(f"{directory}: checkpoint does not match config.json: " + "; ".join(parts))
    for name, slot in layout.items():
        handle, key = handles[name]
        info = handle.get_slice(key)
        shape, dtype = tuple(info.get_shape()), info.get_dtype()
        if shape != slot.shape:
            raise CheckpointError(f"{directory}: tensor {name} has shape {list(shape)}, expected {list(slot.shape)}")
        require_float(directory, name, dtype)
    pending: dict[tuple[int, int | None], dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, slot in layout.items():
            handle, key = handles[name]
            try:
                tensor = handle.get_tensor(key)
            except Exception as e:  # a header that promises more bytes than the file holds
                raise CheckpointError(f"{directory}: cannot read tensor {name}: {e}") from None
            if slot.kind == "plain":
                slot.target.copy_(tensor)
                continue
            parts = pending.setdefault((id(slot.param), slot.index), {})
            parts[slot.kind] = tensor.float()
            if len(parts) == 2:  # W = g * v / |v|, the norm per output channel
                g, v = parts["g"], parts["v"]
                slot.target.copy_((v * (g / v.norm(dim=(1, 2), keepdim=True)))[:, :, 0])


def _open_tensors(directory: Path) -> dict[str, tuple[object, str]]:
    """Canonical name -> (open safetensors file, name in that file), over all shards."""
    handles: dict[str, tuple[object, str]] = {}
    for path in weight_files(directory):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None
        for key in handle.keys():
            name = _canonical(key)
            if name in handles:
                raise CheckpointError(f"{path}: tensor {key} appears twice in the checkpoint")
            handles[name] = (handle, key)
    return handles


def _canonical(name: str) -> str:
    for pattern, replacement in _OLD_ATTENTION:
        name = pattern.sub(replacement, name)
    return name


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
