"""What a CUDA graph captures must make no host round trip: a `.item()`, `.tolist()`, `bool(t)`, a
data-dependent shape (`nonzero`) or a host-side table regrown mid-replay would break capture or
replay on a GPU. Without a GPU, run every captured function on the meta device, where any such
operation raises: the backbone's fixed-shape decode step of each family (`TalkerRunner`) and the
Local and Realtime depth positions (`FixedShapeCalls`)."""
from __future__ import annotations

import pytest
import torch
from conftest import DELAY_DIR
from fish_cases import FISH_DIR
from local_cases import LOCAL_DIR
from realtime_cases import REALTIME_DIR

from mossserve.engine.talker_runner import TalkerRunner
from mossserve.loader import build_on_meta
from mossserve.models.config_utils import read_json

META = torch.device("meta")


def delay_family():
    from mossserve.models.moss_delay import MossDelayModel
    from mossserve.models.moss_delay_config import MossDelayConfig
    from mossserve.models.moss_delay_family import MossDelayFamily

    config = MossDelayConfig.from_file(DELAY_DIR / "tiny_nvq32" / "config.json")
    return MossDelayFamily(build_on_meta(lambda: MossDelayModel(config), torch.float32, META), tokenizer=None)


def local_family():
    from mossserve.models.moss_local import MossLocalModel
    from mossserve.models.moss_local_config import MossLocalConfig
    from mossserve.models.moss_local_family import MossLocalFamily

    config = MossLocalConfig.from_file(LOCAL_DIR / "config.json")
    return MossLocalFamily(build_on_meta(lambda: MossLocalModel(config), torch.float32, META), None)


def realtime_family():
    from mossserve.models.moss_realtime import MossRealtimeModel
    from mossserve.models.moss_realtime_config import MossRealtimeConfig
    from mossserve.models.moss_realtime_family import MossRealtimeFamily

    config = MossRealtimeConfig.from_dict(read_json(REALTIME_DIR / "config.json"))
    return MossRealtimeFamily(build_on_meta(lambda: MossRealtimeModel(config), torch.float32, META), None)


def fish_family():
    from mossserve.models.fish_s2 import FishS2Model
    from mossserve.models.fish_s2_config import FishS2Config
    from mossserve.models.fish_s2_family import FishS2Family

    config = FishS2Config.from_dict(read_json(FISH_DIR / "config.json"))
    model = build_on_meta(lambda: FishS2Model(config), torch.float32, META)
    model.to_rotate_half()
    return FishS2Family(model)


FAMILIES = {"delay": delay_family, "local": local_family, "realtime": realtime_family, "fish": fish_family}


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_functions_make_no_host_round_trip(name: str) -> None:
    runner = TalkerRunner(FAMILIES[name](), 4, 512, 16, mode="static", batch_sizes=(1, 4))
    for size in runner.batch_sizes:
        for keys in (256, runner.cache.max_len):
            step = runner._build_step(size, keys)
            assert runner._static_forward(step, keys).device == META
    calls = getattr(runner.state, "depth_calls", None)
    assert (calls is None) == (name in ("delay", "fish"))
    if calls is not None:
        x = torch.zeros(4, calls.width, device=META)
        buffers = calls.new_buffers(4)
        for key in calls.keys:
            assert calls.forward(key, x, buffers).device == META


def test_a_host_round_trip_is_caught_on_meta() -> None:
    """The check can fail: the data-dependent part of a step (the sampler) refuses to run on meta."""
    fam = local_family()
    runner = TalkerRunner(fam, 4, 128, 16, mode="static", batch_sizes=(1, 4))
    with pytest.raises((RuntimeError, NotImplementedError)):
        fam.step(runner.state, torch.zeros(2, fam.config.language.hidden_size, device=META),
                 torch.tensor([0, 1], device=META))
