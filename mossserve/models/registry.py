"""From a checkpoint directory (or hub id) to a loaded talker family, by config.json's model_type
(Delay and Local share "moss_tts_delay"; Local has a depth transformer in its config)."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidRequestError, MossServeError
from ..loader import (build_on_meta, layer_depth, load_weights, native_bf16, parse_device, parse_dtype,
                      resolve_model_dir, weight_files)
from .config_utils import read_json
from .family import TalkerFamily

log = logging.getLogger("mossserve")
# codec.pth: Fish S2 Pro publishes its codec beside the model only in that form (the MOSS repos have none).
TALKER_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "codec.pth"]
# Each family's layer counts in config.json (key paths), checked against the checkpoint before building.
LAYER_COUNTS = {
    "delay": [("language_config", "num_hidden_layers")],
    "local": [("language_config", "num_hidden_layers"), ("local_num_layers",)],
    "realtime": [("language_config", "num_hidden_layers"), ("local_config", "num_hidden_layers")],
    "fish": [("text_config", "n_layer"), ("audio_decoder_config", "n_layer")],
}


def load_talker(model: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                task: str | None = None) -> TalkerFamily:
    """`task` names which MOSS-TTS Delay model a checkpoint is (tts, dialogue, voice_design,
    sound_effect: its default task and the model card's sampling) where its name does not say."""
    from .presets import check_task

    check_task(task)
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    warn_if_emulated(dtype, device)
    config_dir = resolve_model_dir(model, allow_patterns=["config.json"])
    with _checkpoint_errors(config_dir, "model"):
        config = read_json(config_dir / "config.json")
        kind = talker_kind(config, config_dir)  # refused before its weights come down
    model_dir = resolve_model_dir(model, allow_patterns=TALKER_FILES)
    with _checkpoint_errors(model_dir, "model"):
        return _load_talker(model_dir, str(model), config, kind, device, dtype, task)


def checkpoint_name(model: str | Path, model_dir: Path) -> str:
    """A checkpoint's own name, which says which Delay model it is: a hub id's repository, a local
    directory's last component (`.` stands for the directory it is), or for a snapshot in the hub's
    cache (models--org--name/snapshots/<commit>) its repository. The folders above a local copy
    (a project named after another model) say nothing of it."""
    if model_dir != Path(model).expanduser():
        return str(model).split("@")[0].split("/")[-1]
    path = Path(os.path.abspath(model_dir))
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    """A half-precision model on a CPU without its instructions (an AVX2 CPU has neither) runs, but
    torch emulates the products, slower than float32 as soon as a few requests share a step (3x at
    16 on an AVX2 EPYC): say so once."""
    if device.type != "cpu":
        return
    if dtype == torch.bfloat16 and not native_bf16(device):
        needs = "AVX512-BF16 or AMX"
    elif dtype == torch.float16 and torch.backends.cpu.get_cpu_capability() != "AVX512":
        needs = "AVX512-FP16 or AMX-FP16"
    else:
        return
    log.warning("this CPU has no native %s products (%s): they are emulated, slower than float32 (3x with 16 "
                "requests at once on an AVX2 CPU); --dtype float32, or auto, is faster on it",
                str(dtype).removeprefix("torch."), needs)


@contextmanager
def _checkpoint_errors(directory: Path, what: str):
    """A config whose fields have the wrong types or sizes fails somewhere while the model is built
    (int("abc"), a layer of -1 units): a CheckpointError naming the directory (the CLI's one line),
    the original error chained for a traceback. Running out of memory is not the checkpoint's fault."""
    try:
        yield
    except (MossServeError, torch.OutOfMemoryError, RecursionError):
        raise
    except (TypeError, ValueError, AttributeError, KeyError, AssertionError, RuntimeError, ArithmeticError) as e:
        raise CheckpointError(f"cannot load the {what} in {directory}: its config does not describe one this "
                              f"loader can build ({type(e).__name__}: {e})") from e


def talker_kind(config: dict, model_dir: Path) -> str:
    """Which family a config.json describes: delay, local, realtime or fish; anything else is refused."""
    model_type = config.get("model_type")
    architectures = architectures_of(config, model_dir / "config.json")
    if model_type == "moss_tts_delay" or "MossTTSDelayModel" in architectures:
        from .moss_local_config import is_local_config

        return "local" if is_local_config(config) else "delay"
    from .moss_realtime_family import is_realtime_config

    if is_realtime_config(config):
        return "realtime"
    from .fish_s2_config import is_fish_config

    if is_fish_config(config):
        return "fish"
    raise CheckpointError(
        f"{model_dir / 'config.json'}: model_type {model_type!r} ({', '.join(architectures) or 'no architectures'}) "
        "is not supported; supported: moss_tts_delay (Delay and Local), moss_tts_realtime, fish_qwen3_omni")


def architectures_of(config: dict, path: Path) -> list[str]:
    """config.json's `architectures`: a list of class names (none when absent)."""
    architectures = config.get("architectures")
    if architectures is None:
        return []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise CheckpointError(f"{path}: architectures must be a list of class names, got {architectures!r}")
    return architectures


def check_layer_counts(config: dict, kind: str, model_dir: Path) -> None:
    """A layer count beyond any stack the checkpoint holds (10^12) would build modules for hours before
    the weights were found missing: refused first, against the safetensors headers."""
    depth = layer_depth(weight_files(model_dir))
    for path in LAYER_COUNTS[kind]:
        try:
            count = int(_lookup(config, path))
        except (TypeError, ValueError, OverflowError):
            continue  # not a number: the family's config parser names it
        if count > depth:
            raise CheckpointError(f"{model_dir / 'config.json'}: {'.'.join(path)} is {count}, but the checkpoint's "
                                  f"deepest layer stack has {depth} layer(s)")


def _lookup(config: dict, path: tuple[str, ...]) -> object:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _load_talker(model_dir: Path, name: str, config: dict, kind: str, device: torch.device, dtype: torch.dtype,
                 task: str | None) -> TalkerFamily:
    check_layer_counts(config, kind, model_dir)
    if kind == "delay":
        talker = _load_delay(model_dir, name, config, device, dtype, task)
    elif kind == "local":
        _refuse_task(task, "MOSS-TTS-Local")
        talker = _load_local(model_dir, name, config, device, dtype)
    elif kind == "realtime":
        from .moss_realtime_family import load_realtime

        _refuse_task(task, "MOSS-TTS-Realtime")
        return load_realtime(model_dir, name, config, device, dtype)
    else:
        from .fish_s2_family import load_fish

        _refuse_task(task, "Fish S2 Pro")
        return load_fish(model_dir, config, device, dtype)
    talker.source = model_dir
    return talker


def _refuse_task(task: str | None, model: str) -> None:
    if task is not None:
        raise CheckpointError(f"a task ({task!r}) names which MOSS-TTS Delay model a checkpoint is; {model} has one")


def _load_delay(model_dir: Path, name: str, config: dict, device: torch.device, dtype: torch.dtype,
                task: str | None = None) -> TalkerFamily:
    from ..text.tokenizer import TextTokenizer
    from .moss_delay import MossDelayModel
    from .moss_delay_config import MossDelayConfig
    from .moss_delay_family import MossDelayFamily
    from .presets import preset_for, task_from_name

    delay_config = MossDelayConfig.from_dict(config, str(model_dir / "config.json"))
    files = weight_files(model_dir)
    tokenizer = TextTokenizer.from_dir(model_dir)
    model = build_on_meta(lambda: MossDelayModel(delay_config), dtype, device)
    load_weights(model, files, model.checkpoint_layout())
    own_name = checkpoint_name(name, model_dir)
    preset = preset_for(model_dir, own_name, delay_config.n_vq, task=task)
    family = MossDelayFamily(model.eval().requires_grad_(False), tokenizer, default_task=preset.task,
                             sampling_defaults=preset.sampling, max_new_frames=preset.max_new_frames)
    _check_defaults(family, model_dir)
    named = task_from_name(own_name)
    if task is None and named is None and delay_config.n_vq != 32:
        log.warning("%s: %d codebooks, and its name does not say which MOSS model it is (MOSS-TTS has 32; MOSS-TTSD, "
                    "-VoiceGenerator and -SoundEffect have 16); loading it as MOSS-TTS (task tts, its sampling "
                    "defaults). Give --task dialogue, voice_design or sound_effect if it is one of those.",
                    name, delay_config.n_vq)
    elif task is None and named is not None and delay_config.n_vq == 32:
        log.warning("%s: its name says %s, but it has 32 codebooks, as MOSS-TTS has (the others have 16); "
                    "give --task tts if it is MOSS-TTS.", name, named)
    return family


def _load_local(model_dir: Path, name: str, config: dict, device: torch.device, dtype: torch.dtype) -> TalkerFamily:
    """MOSS-TTS-Local-Transformer: upstream's `MossTTSDelayConfig` with a depth transformer."""
    from ..text.tokenizer import TextTokenizer
    from .moss_local import MossLocalModel
    from .moss_local_config import MossLocalConfig
    from .moss_local_family import LOCAL_SAMPLING, MossLocalFamily
    from .presets import Preset, preset_for

    local_config = MossLocalConfig.from_dict(config, str(model_dir / "config.json"))
    tokenizer = TextTokenizer.from_dir(model_dir)
    model = build_on_meta(lambda: MossLocalModel(local_config), dtype, device)
    load_weights(model, weight_files(model_dir), model.checkpoint_layout())
    model.drop_unused_weights()
    preset = preset_for(model_dir, name, local_config.n_vq, base=Preset("tts", LOCAL_SAMPLING, 4096))
    family = MossLocalFamily(model.eval().requires_grad_(False), tokenizer, sampling_defaults=preset.sampling,
                             max_new_frames=preset.max_new_frames)
    _check_defaults(family, model_dir)
    return family


def _check_defaults(family: TalkerFamily, model_dir: Path) -> None:
    """generation_config.json's settings, in range (preset_for) but ones this family cannot sample
    with (a repetition window): the checkpoint's error at load, not every request's."""
    try:
        family.check_sampling(family.default_sampling())
    except InvalidRequestError as e:
        raise CheckpointError(f"{model_dir / 'generation_config.json'}: {e}") from None


def load_codec(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """A codec checkpoint directory or hub id -> a loaded codec (the codec seam). A directory
    holding `codec.safetensors` / `codec.pth` (a Fish S2 Pro model) is the Fish modded DAC."""
    from .codecs.fish_dac_loader import CODEC_FILES, is_fish_codec_dir, load_fish_dac
    from .codecs.moss_audio_tokenizer import MossAudioTokenizer
    from .codecs.moss_audio_tokenizer_config import MODEL_TYPES, names_moss_audio_tokenizer

    device = parse_device(device)
    codec_dir = resolve_model_dir(name_or_path, allow_patterns=["*.json", *CODEC_FILES])
    if is_fish_codec_dir(codec_dir):
        with _checkpoint_errors(codec_dir, "codec"):
            return load_fish_dac(codec_dir, device=device, dtype=None if dtype is None else parse_dtype(dtype, device))
    config = read_json(codec_dir / "config.json")
    model_type = config.get("model_type")
    # refused before its weights come down
    if not names_moss_audio_tokenizer(model_type, architectures_of(config, codec_dir / "config.json")):
        inside = (f" (a model directory: its codec is {codec_dir / 'codec'})"
                  if (codec_dir / "codec" / "config.json").is_file() else "")
        raise CheckpointError(f"{codec_dir / 'config.json'}: codec type {model_type!r} is not supported{inside}; "
                              f"supported: MOSS-Audio-Tokenizer (model_type {' or '.join(MODEL_TYPES)}), or a "
                              "Fish S2 Pro directory with codec.pth / codec.safetensors")
    codec_dir = resolve_model_dir(name_or_path, allow_patterns=["*.json", "*.safetensors"])
    with _checkpoint_errors(codec_dir, "codec"):
        return MossAudioTokenizer.from_pretrained(codec_dir, device=device,
                                                  dtype=None if dtype is None else parse_dtype(dtype, device))
