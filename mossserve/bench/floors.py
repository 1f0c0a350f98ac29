"""Machine limits and per-step floors for the engine bench.

Measured in the bench's own process, on its thread settings, in about a second each:

* `memory_bandwidth`: read bandwidth from memory: the best of a few `sum()` passes over a float32
  tensor far larger than the last-level cache (bytes read / seconds).
* `gemm_throughput`: matmul throughput in the bench dtype, best of a square GEMM (the machine's
  peak) and a batch-16 decode-shaped one (16 rows times a weight of the model's MLP shape), in
  GFLOP/s (2 m n k per matmul).

`count_step` counts what one decode step of a loaded talker does, by running a real step (the
backbone's decode forward plus the family's step: heads, depth loop, sampling) under a dispatch
mode that sees every aten op:

* weight bytes: the union of the parameter bytes that any op other than a gather reads (matmuls,
  norms, slices of stacked heads); embedding tables that are only gathered (`embedding`,
  `embedding_bag`, `index_select`) are not counted, and a weight read several times in a step
  (a depth transformer runs once per channel) is counted once: the least a step must move;
* FLOPs: 2 m n k of every matmul (`linear`, `matmul`, `mm`, `addmm`, `bmm`, `baddbmm`, `mv`,
  `addmv`), which covers every weight of the step once per use (2 x params touched x batch, the
  depth loop's repeats included), plus the attention of every fused
  `scaled_dot_product_attention` kernel (4 x batch x heads x queries x keys x head_dim) over the
  context the step sees, reported apart as `attention_flops`.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op -> index of its first matrix operand: FLOPs = 2 x output elements x that operand's last dim
MATMULS = {aten.mm: 0, aten.addmm: 1, aten.bmm: 0, aten.baddbmm: 1, aten.linear: 0, aten.matmul: 0, aten.mv: 0,
           aten.addmv: 1}
GATHERS = {aten.embedding, aten.embedding_bag, aten._embedding_bag, aten._embedding_bag_forward_only,
           aten.index_select, aten.index, aten.gather}  # op packets (every overload)
ATTENTION = "scaled_dot_product"


def _best(fn: Callable[[], object], runs: int, min_time: float = 0.0) -> float:
    """Best wall time of `fn` over `runs` timed runs (after one untimed), each repeated until it
    takes at least `min_time` (then the time per call)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / calls)
    return best


def memory_bandwidth(size_mb: float = 256.0, runs: int = 5, device: str | torch.device = "cpu") -> dict:
    """Read bandwidth in GB/s (1e9 bytes) of `device`'s memory: best of `runs` sums of a float32
    tensor of `size_mb` MiB (at least 1 GiB on a GPU, whose last-level cache holds tens of MB)."""
    device = torch.device(device)
    if device.type == "cuda":
        size_mb = max(size_mb, 1024.0)
    data = torch.ones(int(size_mb * 2**20) // 4, dtype=torch.float32, device=device)
    seconds = _best(lambda: float(data.sum()), runs)  # the host read waits for the sum
    nbytes = data.numel() * 4
    return {"gb_s": nbytes / seconds / 1e9, "bytes": nbytes, "seconds": seconds, "method": "sum of a float32 tensor",
            "device": str(device)}


def gemm_throughput(dtype: torch.dtype, hidden: int, intermediate: int, square: int | None = None, rows: int = 16,
                    runs: int = 3, min_time: float = 0.1, device: str | torch.device = "cpu") -> dict:
    """GFLOP/s of a square (square^3; 2048 on CPU, 8192 on a GPU) matmul and of a (rows, hidden) x
    (hidden, 2 intermediate) decode-shaped one (an MLP's fused gate/up projection), in `dtype` on
    `device`; `gflop_s` is the better."""
    device = torch.device(device)
    square = square or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)

    def rate(m: int, k: int, n: int) -> float:
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        weight = torch.randn(n, k, generator=gen).to(device, dtype)  # (out, in), as a model's weight

        def product() -> None:
            F.linear(a, weight)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        with torch.inference_mode():
            seconds = _best(product, runs, min_time)
        return 2.0 * m * n * k / seconds / 1e9

    square_rate = rate(square, square, square)
    shaped_rate = rate(rows, hidden, 2 * intermediate)
    return {"gflop_s": max(square_rate, shaped_rate), "square_gflop_s": square_rate, "square_n": square,
            "decode_shaped_gflop_s": shaped_rate, "decode_shape": [rows, hidden, 2 * intermediate],
            "dtype": str(dtype).removeprefix("torch.")}


class _StepCounter(TorchDispatchMode):
    """Weight bytes read (union per parameter storage) and FLOPs of the ops run under it."""

    def __init__(self, parameters: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.params = {p.untyped_storage().data_ptr(): p for p in parameters.values()}
        self.names = {p.untyped_storage().data_ptr(): name for name, p in parameters.items()}
        self.intervals: dict[int, list[tuple[int, int]]] = {}
        self.matmul_flops = 0
        self.attention_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in MATMULS:
            self.matmul_flops += 2 * out.numel() * args[MATMULS[packet]].shape[-1]
        elif ATTENTION in func.__name__ and "backward" not in func.__name__:
            q, k = args[0], args[1]  # (B, heads, Lq, d), (B, kv_heads, Lk, d)
            self.attention_flops += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        if packet not in GATHERS and not func.is_view:
            for arg in [*args, *kwargs.values()]:
                for t in arg if isinstance(arg, (list, tuple)) else (arg,):
                    if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
                        key = t.untyped_storage().data_ptr()
                        if key in self.params:
                            extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
                            self.intervals.setdefault(key, []).append((t.storage_offset(), t.storage_offset() + extent))
        return out

    def weight_bytes(self) -> dict[str, int]:
        """Bytes read per parameter (each byte once), by parameter name."""
        read = {}
        for key, spans in self.intervals.items():
            covered, end_so_far = 0, -1
            for start, end in sorted(spans):
                start = max(start, end_so_far)
                if end > start:
                    covered += end - start
                end_so_far = max(end_so_far, end)
            read[self.names[key]] = covered * self.params[key].element_size()
        return read


def count_step(talker, prompts: list, sampling, prefill_tokens: int, batch: int) -> dict:
    """Weight bytes and FLOPs of one steady-state decode step at `batch` rows: the first prompt,
    `batch` times, is prefilled (and its first two steps taken) on a private eager runner, then one decode forward
    and one family step run under the counter."""
    from ..engine.talker_runner import TalkerRunner
    from ..layers.cpu_kernels import torch_products

    prompt = prompts[0]
    runner = TalkerRunner(talker, batch, len(prompt.rows) + 4, prefill_tokens, "eager")
    slots = [runner.allocate() for _ in range(batch)]
    for slot in slots:
        talker.admit(runner.state, slot, prompt, sampling)
    for start in range(0, len(prompt.rows), prefill_tokens):  # all rows at once, piece by piece
        hidden = runner.prefill(slots, [prompt.rows[start : start + prefill_tokens]] * batch)
    # The bf16 CPU kernels run outside aten, where the counter cannot see them: the counted step runs
    # torch's ops, and so does the decode step before it, which does their one-time work (the heads'
    # form timing) outside the counter.
    with torch_products():
        runner.step(hidden, slots)
        runner.step(runner.decode(slots), slots)
    context = int(np.mean([runner.cache.lengths[s] for s in slots])) + 1
    counter = _StepCounter(talker.decode_weights())  # after two steps: copies a family makes on first use exist
    with counter, torch_products():
        hidden = runner.decode(slots)
        runner.step(hidden, slots)
    for slot in slots:
        runner.release(slot)
    read = counter.weight_bytes()
    return {"batch": batch, "weight_bytes": sum(read.values()), "weight_bytes_by_parameter": read,
            "matmul_flops": counter.matmul_flops, "attention_flops": counter.attention_flops,
            "flops": counter.matmul_flops + counter.attention_flops, "context_rows": context}


def floors(bandwidth_gb_s: float, gemm_gflop_s: float, step1: dict, step16: dict, step_s_1: float,
           step_s_16: float) -> dict:
    """The floor figures of the bench (see docs/bench.md): step floors at batch 1 (memory) and 16
    (compute, or memory where that is higher) against the measured step times."""
    weight_bytes = step1["weight_bytes"]
    floor_1 = weight_bytes / (bandwidth_gb_s * 1e9)
    compute_16 = step16["flops"] / (gemm_gflop_s * 1e9)
    memory_16 = step16["weight_bytes"] / (bandwidth_gb_s * 1e9)
    floor_16 = max(compute_16, memory_16)
    return {
        "weight_bytes_per_step": weight_bytes,
        "memory_bandwidth_gb_s": bandwidth_gb_s,
        "step_floor_s_1": floor_1,
        "step_s_1": step_s_1,
        "fraction_1": floor_1 / step_s_1,
        "flops_per_step_16": step16["flops"],
        "attention_flops_16": step16["attention_flops"],
        "context_rows_16": step16["context_rows"],
        "gemm_gflop_s": gemm_gflop_s,
        "compute_floor_s_16": compute_16,
        "memory_floor_s_16": memory_16,
        "bound_16": "compute" if compute_16 >= memory_16 else "memory",
        "step_floor_s_16": floor_16,
        "step_s_16": step_s_16,
        "fraction_16": floor_16 / step_s_16,
    }
