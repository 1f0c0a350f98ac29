"""Hub ids: what is downloaded for each model family (through a fake `snapshot_download` that serves
a fixture directory as the published repository, honouring `allow_patterns` as the hub client does),
revisions, and a codec that does not fit its model."""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from mossserve.api import TTS
from mossserve.errors import CheckpointError
from mossserve.models.codecs.fish_dac import FishDac
from mossserve.models.registry import load_codec, load_talker

FIXTURES = Path(__file__).parent / "fixtures"


class FakeHub:
    """Repositories (id -> directory); each download copies the files `allow_patterns` admits."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos, self.calls = root, repos, []

    def snapshot_download(self, repo_id: str, revision: str | None = None, allow_patterns=None, **_) -> str:
        self.calls.append((repo_id, revision, allow_patterns))
        out = self.root / repo_id.replace("/", "--") / (revision or "main")
        out.mkdir(parents=True, exist_ok=True)
        for file in self.repos[repo_id].iterdir():
            if file.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(file.name, p) for p in allow_patterns)):
                shutil.copy(file, out / file.name)
        return str(out)


@pytest.fixture
def fish_repo(tmp_path: Path) -> Path:
    """The fixture laid out as fishaudio/s2-pro publishes it: the codec only as codec.pth."""
    repo = tmp_path / "published"
    shutil.copytree(FIXTURES / "fish_s2_pro", repo, ignore=shutil.ignore_patterns("*.npz", "codec.safetensors"))
    return repo


def test_a_fish_hub_id_brings_its_own_codec(monkeypatch, tmp_path: Path, fish_repo: Path) -> None:
    hub = FakeHub(tmp_path / "cache", {"fishaudio/s2-pro": fish_repo})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    tts = TTS.from_pretrained("fishaudio/s2-pro")
    assert (Path(tts.codec_source) / "codec.pth").is_file()
    assert isinstance(tts.codec, FishDac)
    assert {repo for repo, _, _ in hub.calls} == {"fishaudio/s2-pro"}  # nothing else fetched (no MOSS codec)


def test_a_revision_is_passed_to_the_hub(monkeypatch, tmp_path: Path, fish_repo: Path) -> None:
    hub = FakeHub(tmp_path / "cache", {"fishaudio/s2-pro": fish_repo})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    assert isinstance(load_codec("fishaudio/s2-pro@v1.0"), FishDac)
    assert hub.calls[0][:2] == ("fishaudio/s2-pro", "v1.0")


@pytest.mark.parametrize("name", ["fishaudio/s2-pro@", "fishaudio/s2-pro@v1@v2", "not a/hub id"])
def test_a_malformed_hub_id_is_not_fetched(monkeypatch, name: str) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: pytest.fail("fetched"))
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_codec(name)


def test_a_hub_failure_is_a_one_line_error(monkeypatch, capsys) -> None:
    """huggingface_hub's offline message runs over two lines; a CLI error is one."""
    import huggingface_hub

    from mossserve.cli import main

    def offline(**_):
        raise OSError("We couldn't connect to 'https://huggingface.co'. Got: ConnectError.\n"
                      "Check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["say", "Hi.", "--model", "test-org/absent", "--codes-out", "c.npy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be fetched from the hub: We couldn't connect" in err
    assert "ConnectError. Check your internet connection." in err


def test_a_codec_that_does_not_fit_the_model_is_refused(delay_model_dirs) -> None:
    """A MOSS-TTS model with the Fish codec (44.1 kHz): one clear error, before any request runs."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=FIXTURES / "fish_s2_pro")
    with pytest.raises(CheckpointError, match=r"does not fit the delay model \(24000 Hz, 16 codebooks\)"):
        tts.codec


def test_a_checkpoint_of_another_kind_is_refused_before_its_weights_come_down(monkeypatch, tmp_path: Path,
                                                                              delay_model_dirs) -> None:
    """A model given as --codec, or an unsupported model type: only config files are fetched (a real
    repository's weights are gigabytes)."""
    unsupported = tmp_path / "local-v1.5"
    shutil.copytree(delay_model_dirs["tiny_nvq16"], unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").unlink()
    (unsupported / "config.json").write_text(json.dumps(config | {"model_type": "moss_tts_local",
                                                                   "architectures": ["MossTTSLocalModel"]}))
    hub = FakeHub(tmp_path / "cache", {"OpenMOSS-Team/MOSS-TTS": delay_model_dirs["tiny_nvq16"],
                                       "OpenMOSS-Team/MOSS-TTS-Local-Transformer-v1.5": unsupported})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    with pytest.raises(CheckpointError, match="codec type 'moss_tts_delay' is not supported"):
        load_codec("OpenMOSS-Team/MOSS-TTS")
    with pytest.raises(CheckpointError, match="model_type 'moss_tts_local'"):
        load_talker("OpenMOSS-Team/MOSS-TTS-Local-Transformer-v1.5")
    fetched = {file.name for file in (tmp_path / "cache").rglob("*") if file.is_file()}
    assert fetched and not any(name.endswith(".safetensors") for name in fetched)


def test_a_pinned_commit_comes_from_the_hub_cache_when_the_hub_cannot_be_reached(monkeypatch, tmp_path: Path,
                                                                                fish_repo: Path) -> None:
    """HF_HUB_OFFLINE=1: the hub client looks in its cache for a branch, not for a commit, unless asked to."""
    hub = FakeHub(tmp_path / "cache", {"fishaudio/s2-pro": fish_repo})
    commit = "0123456789abcdef0123456789abcdef01234567"

    def offline(repo_id: str, revision=None, allow_patterns=None, local_files_only: bool = False, **_):
        if not local_files_only:
            raise OSError(f"Cannot reach https://huggingface.co/api/models/{repo_id}/tree/{revision}: offline mode")
        return hub.snapshot_download(repo_id, revision, allow_patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert isinstance(load_codec(f"fishaudio/s2-pro@{commit}"), FishDac)
    assert hub.calls[0][:2] == ("fishaudio/s2-pro", commit)
