"""layers/cpu_decode.py: a bf16 decode step's or prefill piece's decoder layers in one call of our
CPU kernel. It computes what torch's layers compute up to the order of fp32 sums (rows of one slot
in one call attending to each other as torch's causal mask lets them), writes the cache where torch
writes it and nowhere else, gives a row the same bits whatever runs beside it and on any thread
count, reproduces the reference's teacher-forced logits through the cache within the bf16
tolerance, and leaves every other case to torch's layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DELAY_DIR, needs_amx, needs_cpu_kernels
from realtime_cases import REALTIME_DIR, golden
from test_bfloat16 import assert_within_bf16_tolerance, bf16_model

import mossserve.models.qwen3 as qwen3
from mossserve.layers import cpu_decode, cpu_kernels
from mossserve.layers.batch_context import BatchContext
from mossserve.models.qwen3 import Qwen3Model
from mossserve.models.qwen3_config import Qwen3Config
from mossserve.models.registry import load_talker

LAYERS, SLOTS, CACHE_LEN, KV_HEADS = 2, 17, 40, 2


def backbone(head_dim: int, qk_norm: bool = True, heads: int = 4) -> Qwen3Model:
    # intermediate 100: gate|up has 200 rows (AMX blocks of 16 and a tail), down's k is not a multiple of 32
    config = Qwen3Config(hidden_size=64, intermediate_size=100, num_hidden_layers=LAYERS, num_attention_heads=heads,
                         num_key_value_heads=KV_HEADS, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
                         vocab_size=32, max_position_embeddings=256, qk_norm=qk_norm)
    torch.manual_seed(head_dim)
    model = Qwen3Model(config)
    with torch.no_grad():
        for p in model.parameters():  # norms near one, projections that keep the stream's scale
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    return model.bfloat16().requires_grad_(False)


def random_cache(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (LAYERS, SLOTS, KV_HEADS, CACHE_LEN, head_dim)
    return torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16()


def torch_layers(model: Qwen3Model, x, ctx, cache_k, cache_v) -> torch.Tensor:
    """What Qwen3Model.forward runs without the kernel, before its final norm."""
    rotary = model.rotary.cos_sin(ctx.positions, ctx.kv_len, x.dtype)
    for i, layer in enumerate(model.layers):
        x = layer(x, ctx, rotary, cache_k[i], cache_v[i])
    return x


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in bf16 steps at the largest magnitude of a."""
    step = torch.ldexp(torch.ones(()), torch.frexp(a.float().abs().max()).exponent - 8)
    return float((a.float() - b.float()).abs().max() / step)


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("head_dim, qk_norm", [(4, True), (6, False), (16, True), (24, True), (128, False)])
def test_the_kernel_computes_torchs_layers(rows, head_dim, qk_norm):
    assert_computes_torchs_layers(rows, head_dim, qk_norm, heads=4)


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("heads", [2, 12, 18])
def test_query_heads_share_their_key_value_head_in_any_number(rows, heads):
    """Grouped-query attention: one, six (a chunk of four and one of two) and nine query heads per
    key/value head, attended together."""
    assert_computes_torchs_layers(rows, 16, True, heads=heads)


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("heads", [2, 4, 8])
def test_the_usual_group_sizes_of_64_wide_heads(rows, heads):
    """Groups of one, two and four heads of 64 (the released models' and the bench checkpoint's
    sizes), which attention runs with its sizes as constants."""
    assert_computes_torchs_layers(rows, 64, True, heads=heads)


@needs_cpu_kernels
@pytest.mark.parametrize("prompts, length", [(1, 2), (4, 4)] + [pytest.param(*case, marks=needs_amx)
                                                           for case in ((1, 21), (3, 7), (5, 8))])
def test_prefill_pieces_compute_torchs_layers(prompts, length):
    """Rows of one slot at consecutive positions in one call (a prefill piece; 5 x 8 = 40 rows: AMX
    blocks of 16 and a partial one; past 16 rows the kernel runs on AMX only): each attends to the
    pieces' earlier rows as torch's causal mask lets it. Fails if a row attended before the others'
    keys were written, or past its position."""
    assert_computes_torchs_layers(prompts, 16, True, heads=4, length=length)


@needs_cpu_kernels
def test_rows_past_sixteen_need_amx_and_fit_the_prefill_budget(monkeypatch):
    """Past 16 rows the kernel runs only on AMX tiles, and only while x (rows x the widest product's
    k, bf16) fits PREFILL_X_BYTES; other pieces take torch's layers."""
    model = backbone(16)
    cache_k, cache_v = random_cache(16)
    monkeypatch.setattr(cpu_decode, "PREFILL_X_BYTES", 20 * 100 * 2)  # 20 rows at the widest k (intermediate 100)
    amx = cpu_kernels.bf16_kernels().amx
    for length in (16, 17, 20, 21):
        x = torch.randn(1, length, 64).bfloat16()
        ctx = BatchContext.build([0], length, [0], x.device)
        got = cpu_decode.decode_layers(model.layers, model.rotary, x, ctx, cache_k.clone(), cache_v.clone())
        assert (got is not None) == (length <= 16 or (amx and length <= 20)), length


def assert_computes_torchs_layers(rows: int, head_dim: int, qk_norm: bool, heads: int, length: int = 1) -> None:
    model = backbone(head_dim, qk_norm, heads)
    cache_k, cache_v = random_cache(head_dim)
    x = torch.randn(rows, length, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    positions = [(7 * i + 3) % (CACHE_LEN - length + 1) for i in range(rows)]
    slots = [(5 * i + 4) % SLOTS for i in range(rows)]  # distinct, not in order
    ctx = BatchContext.build(positions, length, slots, x.device)
    torch_k, torch_v, ours_k, ours_v = cache_k.clone(), cache_v.clone(), cache_k.clone(), cache_v.clone()
    expected = torch_layers(model, x, ctx, torch_k, torch_v)
    got = cpu_decode.decode_layers(model.layers, model.rotary, x, ctx, ours_k, ours_v)
    assert got is not None and got.shape == x.shape and got.dtype == torch.bfloat16
    # The sums inside norms and attention run in another order than torch's: a bf16 step or two.
    assert ulps_apart(expected, got) <= 3
    written = torch.zeros(SLOTS, CACHE_LEN, dtype=torch.bool)
    for slot, start in zip(slots, positions):
        written[slot, start : start + length] = True
    for ours, theirs, before in ((ours_k, torch_k, cache_k), (ours_v, torch_v, cache_v)):
        at = written[None, :, None, :, None].expand_as(before)
        assert torch.equal(ours[~at], before[~at]), "the kernel wrote outside the rows' positions"
        assert ulps_apart(theirs[at], ours[at]) <= 3


@needs_cpu_kernels
def test_a_row_gets_the_same_bits_whatever_its_company_and_thread_count():
    """Within each product path (FMAs for one to four rows, AMX tiles from five where the CPU has
    them; blocks of 16 past 16 rows, on AMX only: the next test) a row's bits do not depend on the other rows, their order,
    or the number of threads."""
    run = decode_rows_of_one_batch()
    four = run([0, 1, 2, 3])
    for r in range(4):
        assert torch.equal(run([r])[0], four[r])
    assert torch.equal(run([3, 1]), four[[3, 1]])
    sixteen = run(list(range(16)))
    assert torch.equal(run([9, 2, 15, 4, 11]), sixteen[[9, 2, 15, 4, 11]])
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        assert torch.equal(run([0, 1, 2, 3]), four)
        assert torch.equal(run(list(range(16))), sixteen)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_past_sixteen_rows_a_row_gets_the_same_bits_in_blocks_of_sixteen():
    run = decode_rows_of_one_batch()
    every = run(list(range(SLOTS)))  # 17 rows: a block of 16 and a block of one
    assert torch.equal(every[:16], run(list(range(16))))
    assert torch.equal(run([16, 0, 1, 2, 3]), every[[16, 0, 1, 2, 3]])


def decode_rows_of_one_batch():
    """run(rows): the kernel's decode step of those rows of one fixed batch (SLOTS rows, each with its
    own position and slot), with the cache as it was before."""
    model = backbone(16)
    cache_k, cache_v = random_cache(16)
    x = torch.randn(SLOTS, 1, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    positions = [(11 * i + 5) % CACHE_LEN for i in range(SLOTS)]
    slots = [(3 * i + 1) % SLOTS for i in range(SLOTS)]

    def run(rows: list[int]) -> torch.Tensor:
        ctx = BatchContext.build([positions[r] for r in rows], 1, [slots[r] for r in rows], x.device)
        return cpu_decode.decode_layers(model.layers, model.rotary, x[rows], ctx, cache_k.clone(), cache_v.clone())

    return run


@needs_cpu_kernels
def test_five_rows_and_more_run_on_amx_where_the_cpu_has_it():
    """So that the 7- and 16-row cases above test the AMX path on such a CPU (this host has it)."""
    flags = open("/proc/cpuinfo").read().split()
    assert cpu_kernels.bf16_kernels().amx == ("amx_bf16" in flags and "amx_tile" in flags)


def test_every_other_case_takes_torchs_layers(monkeypatch):
    model = backbone(16)
    cache_k, cache_v = random_cache(16)
    one = torch.randn(1, 1, 64).bfloat16()
    ctx = BatchContext.build([3], 1, [0], one.device)
    declined = [
        (model.layers, one.float(), ctx, cache_k, cache_v),  # float32 stream
        (model.layers, one, BatchContext.build([3], 1, None, one.device), None, None),  # no cache
        (model.layers, one, ctx, cache_k.float(), cache_v.float()),  # a float32 cache
        (model.layers, one, ctx, cache_k.transpose(3, 4), cache_v.transpose(3, 4)),  # not contiguous
        (model.layers, one, BatchContext.build([CACHE_LEN], 1, [0], one.device), cache_k, cache_v),  # past the cache
        (model.layers, one, BatchContext.build([3], 1, [SLOTS], one.device), cache_k, cache_v),  # no such slot
    ]
    for layers, x, c, k, v in declined:
        assert cpu_decode.decode_layers(layers, model.rotary, x, c, k, v) is None
    with cpu_kernels.torch_products():
        assert cpu_decode.decode_layers(model.layers, model.rotary, one, ctx, cache_k, cache_v) is None
    learning = backbone(16).requires_grad_(True)
    assert cpu_decode.decode_layers(learning.layers, learning.rotary, one, ctx, cache_k, cache_v) is None
    monkeypatch.setenv("MOSSSERVE_CPU_KERNELS", "0")
    cpu_kernels.bf16_kernels.cache_clear()
    try:
        assert cpu_decode.decode_layers(model.layers, model.rotary, one, ctx, cache_k, cache_v) is None
    finally:
        cpu_kernels.bf16_kernels.cache_clear()


def count_kernel_calls(monkeypatch, module) -> list[bool]:
    """Whether each call of `module`'s decode_layers ran the kernel."""
    calls: list[bool] = []

    def counted(*args):
        out = cpu_decode.decode_layers(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, "decode_layers", counted)
    return calls


@pytest.fixture
def fused_calls(monkeypatch) -> list[bool]:
    """Whether each backbone call ran the kernel."""
    return count_kernel_calls(monkeypatch, qwen3)


@needs_cpu_kernels
@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
def test_delay_teacher_forced_logits_through_the_cache(checkpoint, fused_calls):
    """The reference's teacher-forced logits, one row at a time through the cache by the kernel."""
    from mossserve.models.moss_delay import MossDelayModel
    from mossserve.models.moss_delay_config import MossDelayConfig

    model = bf16_model(MossDelayModel, MossDelayConfig, DELAY_DIR / checkpoint)
    lang = model.config.language
    golden_tf = np.load(DELAY_DIR / checkpoint / "goldens_tf.npz")
    case = "tf_clone_prompt"
    g = {k[len(case) + 1 :]: golden_tf[k] for k in golden_tf.files if k.startswith(case + "/")}
    ids, mask = torch.from_numpy(g["input_ids"]), g["attention_mask"]
    valid = np.nonzero(mask[0])[0]
    rows = ids[0:1, valid]
    shape = (lang.num_hidden_layers, 1, lang.num_key_value_heads, len(valid), lang.head_dim)
    cache_k, cache_v = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        final = torch.cat([model(rows[:, t : t + 1], BatchContext.build([t], 1, [0], rows.device), cache_k, cache_v)
                           for t in range(len(valid))], dim=1)
        text, audio = model.text_logits(final)[0].float(), model.audio_logits(final)[0].float()
    assert fused_calls and all(fused_calls)
    assert_within_bf16_tolerance(text[:, g["text_logit_cols"]], g["text_logits_at_cols"][0, valid], "text logits")
    positions = [p for p in g["full_positions"] if mask[0, p]]
    index = [int(np.searchsorted(valid, p)) for p in positions]
    full = g["audio_logits_full_at_positions"][0, [list(g["full_positions"]).index(p) for p in positions]]
    assert_within_bf16_tolerance(audio[index], full, "audio logits")


@needs_cpu_kernels
def test_realtime_local_logits_through_the_cache(monkeypatch):
    """Realtime's local transformer, one codebook position at a time through its cache by the kernel,
    gives the reference's teacher-forced local logits within the bf16 tolerance."""
    import mossserve.models.moss_realtime as moss_realtime

    calls = count_kernel_calls(monkeypatch, moss_realtime)
    family = load_talker(REALTIME_DIR, dtype="bfloat16")
    local = family.model.local
    tf = golden("teacher_forced")
    ids, codes = tf["input_ids"], tf["local_codes"]
    with torch.inference_mode():
        hidden = family.model(ids, BatchContext.build([0], ids.shape[1], None, ids.device))[0, tf["positions"]]
        calls.clear()  # the backbone's prefill is not a decode step
        logits = []
        for rows in (slice(0, 3), slice(3, None)):  # the kernel takes up to four rows
            h, c = hidden[rows], codes[rows]
            cache = local.new_cache(h.shape[0], h.device, torch.bfloat16)
            steps = [local.step(h, 0, cache)]
            for position in range(1, local.rvq):
                steps.append(local.step(local.embed_codes(position - 1, c[:, position - 1]), position, cache))
            logits.append(torch.stack(steps, dim=1))
    assert len(calls) == 2 * local.rvq and all(calls)
    assert_within_bf16_tolerance(torch.cat(logits).float(), tf["local_logits"].numpy(), "local logits")


@needs_cpu_kernels
def test_the_kernels_exponential_is_accurate_to_fp32(tmp_path, monkeypatch):
    """SiLU and the softmax weights use the kernel's own vectorised e^x: within a few fp32 steps of
    the exact value over fp32's range, 0 below it, inf above it, NaN kept."""
    import ctypes
    import shutil

    monkeypatch.setenv("MOSSSERVE_CACHE", str(tmp_path))
    library = ctypes.CDLL(str(cpu_kernels.build(shutil.which("cc") or shutil.which("gcc"))))
    exp = library.mossserve_exp_f32
    exp.argtypes, exp.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = torch.cat([torch.linspace(-87.0, 88.0, 100_003), torch.randn(10_000) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    y = torch.empty_like(x)
    exp(x.data_ptr(), y.data_ptr(), len(x))
    exact = x.double().exp()
    assert ((y.double() - exact).abs() / exact).max() < 4 * 2.0**-23
    edges = torch.tensor([-200.0, float("-inf"), 100.0, float("inf"), float("nan")])
    out = torch.empty_like(edges)
    exp(edges.data_ptr(), out.data_ptr(), len(edges))
    assert out[:2].tolist() == [0.0, 0.0] and out[2:4].tolist() == [float("inf")] * 2 and out[4].isnan()


@needs_cpu_kernels
def test_local_depth_logits_through_the_kernel(monkeypatch):
    """MOSS-TTS-Local's depth transformer (no rotary), one channel at a time through its per-frame
    cache by the kernel, gives the reference's teacher-forced logits within the bf16 tolerance."""
    import mossserve.models.moss_local_transformer as local_transformer
    from local_cases import LOCAL_DIR, goldens

    from mossserve.models.moss_local import MossLocalModel
    from mossserve.models.moss_local_config import MossLocalConfig

    calls = count_kernel_calls(monkeypatch, local_transformer)
    model = bf16_model(MossLocalModel, MossLocalConfig, LOCAL_DIR)
    g = goldens("teacher_forced")
    ids, mask = torch.from_numpy(g["tf_clone.input_ids"]), g["tf_clone.attention_mask"].astype(bool)
    labels, positions = torch.from_numpy(g["tf_clone.labels"]), g["tf_clone.positions"]
    valid = np.flatnonzero(mask[0])
    rows = ids[0, valid]
    with torch.no_grad():
        final = model(rows[None], BatchContext.build([0], len(rows), None, rows.device))[0]
        index = torch.from_numpy(np.searchsorted(valid, positions))
        logits = model.teacher_forced_logits(final[index], labels[0, positions])
    assert len(calls) == model.config.channels and all(calls)
    assert_within_bf16_tolerance(torch.stack(logits[1:], dim=1), g["tf_clone.audio_logits"][0], "depth audio logits")
    assert_within_bf16_tolerance(logits[0][:, 151643:151669], g["tf_clone.text_logits_special"][0], "depth text logits")
