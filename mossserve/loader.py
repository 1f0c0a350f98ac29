"""Checkpoints as published: a directory (or Hugging Face hub id) with config.json and safetensors.

Weights are read with safetensors only (no pickle) straight into modules built on the meta
device, so a bf16 8B model never exists in fp32 in memory. The mapping from published names to
our parameters is a `layout`: name -> (parameter, first row), which lets one fused parameter
(q|k|v, gate|up, all audio heads) take several published tensors. Loading is strict: every
published tensor is consumed and every parameter row filled, or the error names the tensor.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, InvalidRequestError

Layout = dict[str, tuple[str, int]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16"}
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a block of a layer stack: ...layers.N.<tensor>
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")  # org/name[@revision]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run on native instructions here: a CUDA device that supports them, or a
    CPU with AVX512-BF16 or AMX. Elsewhere (AVX2 CPUs) oneDNN emulates bf16, slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def parse_device(device: str | torch.device) -> torch.device:
    """A device name checked against this torch build and machine, so that a wrong one fails with a
    sentence before anything loads: cpu, or cuda / cuda:N with that GPU visible."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device!r} is not supported; mossserve runs on cpu and cuda")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        # torch ignores a CPU index, so cpu:1 would quietly run where cpu does: no socket is picked
        raise InvalidRequestError(f"device {device!r}: the CPU has no numbered devices; use cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidRequestError(f"device {device!r}: {why} (torch {torch.__version__}); use cpu, or install "
                                      "a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"device {device!r}: {torch.cuda.device_count()} CUDA device(s) visible")
    return parsed


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name, or "auto": bfloat16 where `native_bf16(device)`, else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def resolve_model_dir(name_or_path: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub id, `org/name` or `org/name@revision` (a branch, tag or
    commit), downloaded (or taken from the local hub cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the checkpoint directory")
    text = str(name_or_path)
    hub_id = HUB_ID.match(text)
    if hub_id is None:
        raise CheckpointError(f"checkpoint directory not found: {path}")
    from huggingface_hub import snapshot_download

    fetch = dict(repo_id=hub_id["repo"], revision=hub_id["revision"], allow_patterns=allow_patterns)
    try:
        return Path(snapshot_download(**fetch))
    except Exception as e:  # the hub client raises many types: offline, not found, gated
        try:  # the local hub cache: the client looks there itself for a branch, but not for a commit
            return Path(snapshot_download(**fetch, local_files_only=True))
        except Exception:
            pass
        why = " ".join(str(e).split())  # one line: the client's messages run over several
        raise CheckpointError(f"{text} is not a local directory and could not be fetched from the hub: {why}") from None


def weight_files(model_dir: Path, stem: str = "model") -> list[Path]:
    """`model.safetensors`, or the shards listed by `model.safetensors.index.json`."""
    index = model_dir / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = [model_dir / name for name in _indexed_files(index)]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which is missing")
        return files
    single = model_dir / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{model_dir}: no {stem}.safetensors or {stem}.safetensors.index.json")


def _indexed_files(index: Path) -> list[str]:
    """The shard names an index's `weight_map` (tensor name -> file name) lists, sorted."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                              "file names)")
    return sorted(set(weight_map.values()))


def require_float(where: str | Path, name: str, dtype: str | torch.dtype) -> None:
    """Refuse a tensor that is not floating point (a safetensors dtype name such as "I32", or a torch
    dtype): copied into a float parameter it would load as garbage weights that still synthesize."""
    is_float = dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype in SAFETENSORS_FLOATS
    if not is_float:
        raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, expected a float type")


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A damaged or unreadable safetensors file as a CheckpointError naming it."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None


def layer_depth(files: list[Path]) -> int:
    """Blocks in the deepest `...layers.N.` stack the files hold, from their headers alone (cheap):
    what bounds a config's layer counts before modules are built for them."""
    depth = 0
    for file in files:
        with _reading(file), safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if (match := LAYER_INDEX.search(name)) is not None:
                    depth = max(depth, int(match[1]) + 1)
    return depth


def build_on_meta(factory: Callable[[], ModuleT], dtype: torch.dtype, device: torch.device | str) -> ModuleT:
    """Construct without allocating or initialising, then allocate uninitialised storage."""
    with torch.device("meta"):
        module = factory()
    return module.to(dtype=dtype).to_empty(device=device)


def load_weights(module: nn.Module, files: list[Path], layout: Layout) -> None:
    """Fill every parameter of `module` from `files` as `layout` says; strict."""
    params = dict(module.named_parameters())
    segments = _segments(params, layout)
    filled: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with _reading(file), safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in layout:
                    unexpected.append(name)
                    continue
                param_name, row = layout[name]
                expected = segments[name]
                header = f.get_slice(name)
                shape = tuple(header.get_shape())
                if shape != expected:
                    raise CheckpointError(f"{file.name}: tensor {name} has shape {list(shape)}, expected {list(expected)}")
                require_float(file, name, header.get_dtype())
                if name in filled:
                    raise CheckpointError(f"tensor {name} appears in more than one file")
                target = params[param_name].data
                with torch.no_grad():
                    target[row : row + shape[0]].copy_(f.get_tensor(name))
                filled.add(name)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {_names(unexpected)}")
    missing = sorted(set(layout) - filled)
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {_names(missing)}")


def _segments(params: dict[str, nn.Parameter], layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape each published tensor must have: its row range of the target parameter."""
    by_param: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name, (param_name, row) in layout.items():
        if param_name not in params:
            raise AssertionError(f"layout maps {name} to unknown parameter {param_name}")
        by_param[param_name].append((row, name))
    uncovered = sorted(set(params) - set(by_param))
    if uncovered:
        raise AssertionError(f"parameters without a published tensor: {uncovered}")
    shapes = {}
    for param_name, entries in by_param.items():
        param = params[param_name]
        entries.sort()
        ends = [row for row, _ in entries[1:]] + [param.shape[0]]
        for (row, name), end in zip(entries, ends):
            shapes[name] = (end - row, *param.shape[1:])
    return shapes


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
