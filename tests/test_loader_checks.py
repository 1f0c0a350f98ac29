"""Odd checkpoints refused at load with a sentence (the CLI's `error: ...`), never a traceback, a hang,
garbage weights or a model that loads but refuses every request; and the name a server gives a model."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CODEC_DIR, DELAY_DIR, FIXTURES, TOKENIZER_DIR
from mossserve.api import default_codec
from mossserve.errors import CheckpointError
from mossserve.loader import weight_files
from mossserve.models.codecs.moss_audio_tokenizer_config import ARCHITECTURE, MODEL_TYPES, MossAudioTokenizerConfig
from mossserve.models.fish_s2_config import FishS2Config
from mossserve.models.registry import load_codec, load_talker
from mossserve.serve.settings import ServerSettings
from mossserve.serve.state import served_name

FISH_DIR = FIXTURES / "fish_s2_pro"
DELAY = DELAY_DIR / "tiny_nvq16"


def linked_copy(source: Path, out: Path, config: dict | None = None) -> Path:
    """`source`'s files linked into `out` (weights are not copied), with `config` as its config.json."""
    out.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "config.json":
            (out / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text()) if config is None else config
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / name).exists():
            (out / name).symlink_to(TOKENIZER_DIR / name)
    return out


def edited(source: Path, path: tuple[str, ...], value) -> dict:
    config = json.loads((source / "config.json").read_text())
    part = config
    for key in path[:-1]:
        part = part[key]
    part[path[-1]] = value
    return config


def test_a_fish_model_without_its_tokenizer_is_refused_at_load(tmp_path: Path) -> None:
    """It loaded, and every speech request was then refused for want of a prompt matrix."""
    model = linked_copy(FISH_DIR, tmp_path / "fish")
    (model / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"fish/tokenizer\.json not found"):
        load_talker(model)


@pytest.mark.parametrize("eos", [10**6, 5376, -1])
def test_a_fish_eos_outside_the_vocabulary_is_refused(eos: int) -> None:
    """10^6 failed on an index; -1 unmasked the vocabulary's last token for sampling."""
    config = edited(FISH_DIR, ("eos_token_id",), eos)
    with pytest.raises(CheckpointError, match=rf"eos_token_id {eos} is outside the vocabulary \(0\.\.5375\)"):
        FishS2Config.from_dict(config)


@pytest.mark.parametrize("load, source", [(load_codec, CODEC_DIR / "tiny"), (load_talker, DELAY)])
@pytest.mark.parametrize("architectures", [5, "MossTTSDelayModel", [3]])
def test_architectures_must_be_a_list_of_names(tmp_path: Path, load, source: Path, architectures) -> None:
    config = edited(source, ("architectures",), architectures)
    config["model_type"] = "x"
    directory = linked_copy(source, tmp_path / "checkpoint", config)
    with pytest.raises(CheckpointError, match="architectures must be a list of class names"):
        load(directory)


@pytest.mark.parametrize("named", [5, ["a/codec"], {"x": 1}])
def test_a_processor_config_naming_its_codec_with_no_string_is_refused(tmp_path: Path, named) -> None:
    (tmp_path / "processor_config.json").write_text(json.dumps({"audio_tokenizer_name_or_path": named}))
    with pytest.raises(CheckpointError, match="audio_tokenizer_name_or_path must be a codec directory or hub id"):
        default_codec(tmp_path)


def test_integer_weights_are_refused_naming_file_tensor_and_dtype(tmp_path: Path) -> None:
    """The model loader cast them into float parameters: garbage weights that still synthesize."""
    tensors = load_file(DELAY / "model.safetensors")
    name = "language_model.norm.weight"
    tensors[name] = tensors[name].to(torch.int32)
    model = linked_copy(DELAY, tmp_path / "ints")
    (model / "model.safetensors").unlink()
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"ints/model\.safetensors: tensor {name} has dtype I32, expected a"):
        load_talker(model)


@pytest.mark.parametrize("model_type", [*MODEL_TYPES, "moss_audio_tokenizer", "x", None])
@pytest.mark.parametrize("architectures", [[ARCHITECTURE], []])
def test_a_codec_type_its_config_refuses_is_refused_before_the_weights(tmp_path: Path, model_type,
                                                                       architectures) -> None:
    """`moss_audio_tokenizer` was admitted, then refused by the config after the weights came down."""
    config = {**json.loads((CODEC_DIR / "real_config.json").read_text()), "architectures": architectures,
              "model_type": model_type}
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: none are fetched for a refused type
    try:
        MossAudioTokenizerConfig.from_dict(config)
    except CheckpointError:
        with pytest.raises(CheckpointError, match=f"codec type {model_type!r} is not supported"):
            load_codec(tmp_path)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a.weight": 3}, {"a.weight": ["x"]}, "x"])
def test_a_malformed_index_is_named_as_one(tmp_path: Path, weight_map) -> None:
    """It was blamed on the config (a TypeError while the model was built)."""
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        weight_files(tmp_path)


@pytest.mark.parametrize("source, path", [
    (DELAY, ("language_config", "num_hidden_layers")),
    (FIXTURES / "moss_tts_local", ("language_config", "num_hidden_layers")),
    (FIXTURES / "moss_tts_local", ("local_num_layers",)),
    (FIXTURES / "moss_tts_realtime", ("language_config", "num_hidden_layers")),
    (FIXTURES / "moss_tts_realtime", ("local_config", "num_hidden_layers")),
    (FISH_DIR, ("text_config", "n_layer")),
    (FISH_DIR, ("audio_decoder_config", "n_layer")),
])
def test_a_layer_count_beyond_the_checkpoints_layers_is_refused_before_building(tmp_path: Path, source: Path,
                                                                                 path: tuple[str, ...]) -> None:
    """10^12 layers spent hours building modules; the deepest stack of these checkpoints has 2 or 3."""
    depth = 3 if source == DELAY else 2
    model = linked_copy(source, tmp_path / "model", edited(source, path, depth + 1))
    key = ".".join(path)
    with pytest.raises(CheckpointError, match=rf"{key} is {depth + 1}, but the checkpoint's deepest layer stack "
                                              rf"has {depth} layer"):
        load_talker(model)


def served(source: Path | None, model: str | None = None) -> str:
    talker = SimpleNamespace(source=source, name="local")
    return served_name(ServerSettings(model=model), SimpleNamespace(is_demo=False, talker=talker))


def test_a_hub_cache_snapshot_is_served_under_its_repository(tmp_path: Path) -> None:
    """It was served under its commit hash."""
    snapshot = tmp_path / "models--OpenMOSS-Team--MOSS-TTS" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert served(snapshot, str(snapshot)) == "MOSS-TTS"


def test_a_model_given_without_a_model_setting_is_served_under_its_source(tmp_path: Path) -> None:
    """create_app(ServerSettings(), tts=...) listed any model as moss-tts-demo, so its real name 404'd."""
    assert served(tmp_path / "my-local-model") == "my-local-model"
    assert served(None) == "local"  # a family built in code names no directory: its family
