"""Which MOSS-TTS Delay model a checkpoint is: its published name, `task` where the name does not
say, and generation_config.json; the model cards' sampling defaults that follow from it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import DELAY_DIR, TOKENIZER_DIR
from mossserve.errors import CheckpointError, InvalidRequestError
from mossserve.models.presets import PRESETS
from mossserve.models.registry import load_talker
from realtime_cases import REALTIME_DIR


def checkpoint(root: Path, name: str, nvq: int = 16, generation: dict | None = None) -> Path:
    out = root / name
    out.mkdir(parents=True)
    (out / "config.json").symlink_to(DELAY_DIR / f"tiny_nvq{nvq}" / "config.json")
    (out / "model.safetensors").symlink_to(DELAY_DIR / f"tiny_nvq{nvq}" / "model.safetensors")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (out / file).symlink_to(TOKENIZER_DIR / file)
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


@pytest.mark.parametrize("name, task", [
    ("MOSS-TTSD-v1.0", "dialogue"), ("MOSS-VoiceGenerator", "voice_design"), ("moss_sound_effect", "sound_effect"),
])
def test_the_published_name_picks_the_model_card(tmp_path: Path, caplog, name: str, task: str) -> None:
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(checkpoint(tmp_path, name))
    assert talker.default_task == task
    assert talker.default_sampling() == PRESETS[task].sampling
    assert not caplog.records


def test_a_directory_named_otherwise_takes_the_task_given(tmp_path: Path, caplog) -> None:
    """`hf download OpenMOSS-Team/MOSS-SoundEffect --local-dir ./sfx`: the name says nothing."""
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(checkpoint(tmp_path, "sfx"), task="sound_effect")
    assert talker.default_task == "sound_effect"
    assert talker.default_sampling() == PRESETS["sound_effect"].sampling
    assert not caplog.records


def test_a_16_codebook_checkpoint_of_no_known_name_is_loaded_as_moss_tts_with_a_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(checkpoint(tmp_path, "sfx"))
    assert talker.default_task == "tts"
    assert talker.default_sampling() == PRESETS["tts"].sampling
    assert "--task" in caplog.text and "16 codebooks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        load_talker(checkpoint(tmp_path, "my-model", nvq=32))  # 32 codebooks: MOSS-TTS itself
    assert not caplog.records


def test_a_name_that_contradicts_the_codebooks_is_warned_about(tmp_path: Path, caplog) -> None:
    """A MOSS-TTS (32 codebooks) saved under a TTSD name."""
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(checkpoint(tmp_path, "MOSS-TTSD-mine", nvq=32))
    assert talker.default_task == "dialogue"  # the name decides, as documented; the warning says how to fix it
    assert "32 codebooks" in caplog.text and "--task tts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        assert load_talker(checkpoint(tmp_path, "MOSS-TTSD-x", nvq=32), task="tts").default_task == "tts"
    assert not caplog.records


@pytest.mark.parametrize("path, nvq, task", [
    ("ttsd_experiments/MOSS-TTS-v1.5", 32, "tts"),
    ("models_ttsd_era/MOSS-VoiceGenerator", 16, "voice_design"),
    ("hub/models--OpenMOSS-Team--MOSS-TTSD-v1.0/snapshots/0123abcd", 16, "dialogue"),
], ids=["tts-under-a-ttsd-folder", "voice-generator-under-a-ttsd-folder", "hub-cache-snapshot"])
def test_the_checkpoints_own_name_decides_not_the_folders_above_it(tmp_path: Path, caplog, path: str, nvq: int,
                                                                   task: str) -> None:
    """Any "ttsd" in a parent folder made every checkpoint below it a dialogue model; a snapshot in the
    hub's cache is named by its repository, not its commit."""
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(checkpoint(tmp_path, path, nvq=nvq))
    assert talker.default_task == task
    assert talker.default_sampling() == PRESETS[task].sampling
    assert not caplog.records


def test_generation_config_overrides_the_card(tmp_path: Path) -> None:
    talker = load_talker(checkpoint(tmp_path, "MOSS-TTSD", generation={"audio_temperature": 0.5, "max_new_tokens": 77}))
    assert talker.default_sampling().audio_temperature == 0.5
    assert talker.default_sampling().audio_top_k == PRESETS["dialogue"].sampling.audio_top_k
    assert talker.max_new_frames == 77
    talker = load_talker(checkpoint(tmp_path, "MOSS-TTSD-null", generation={"max_new_tokens": None}))
    assert talker.max_new_frames == PRESETS["dialogue"].max_new_frames


@pytest.mark.parametrize("value", [0, "100", 2.5, True])
def test_a_bad_max_new_tokens_is_named(tmp_path: Path, value) -> None:
    with pytest.raises(CheckpointError, match="max_new_tokens must be a positive integer"):
        load_talker(checkpoint(tmp_path, "m", generation={"max_new_tokens": value}))


def test_a_task_for_another_family_or_unknown_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="MOSS-TTS-Realtime has one"):
        load_talker(REALTIME_DIR, task="dialogue")
    with pytest.raises(InvalidRequestError, match="unknown task 'speech'"):
        load_talker(checkpoint(tmp_path, "m"), task="speech")


@pytest.mark.parametrize("generation, message", [
    ({"audio_top_p": 5.0}, r"audio_top_p must be in \(0, 1\], got 5.0"),
    ({"audio_temperature": [1.0, 1.0]}, "audio_temperature has 2 values; the model has 16 codebooks"),
    ([1, 2], "expected a JSON object, got list"),
    ({"audio_repetition_window": 50}, "audio_repetition_window is not a setting of the delay family"),
])
def test_a_generation_config_out_of_range_is_the_checkpoints_error_at_load(tmp_path: Path, generation, message) -> None:
    """Not an InvalidRequestError on every request, blaming settings the user never gave."""
    with pytest.raises(CheckpointError, match=message) as error:
        load_talker(checkpoint(tmp_path, "MOSS-TTSD", generation=generation))
    assert "generation_config.json" in str(error.value)


def test_a_dot_reads_the_name_of_the_directory_it_stands_for(tmp_path: Path, monkeypatch, caplog) -> None:
    """`--model .` inside MOSS-TTSD-v1.0: the name is read from the whole path, as `--model ./` would."""
    monkeypatch.chdir(checkpoint(tmp_path, "MOSS-TTSD-v1.0"))
    with caplog.at_level(logging.WARNING, logger="mossserve"):
        talker = load_talker(".")
    assert talker.default_task == "dialogue"
    assert not caplog.records
