"""The reference's static batch over the talker-family seam: all requests start together, each
leaves the batch when it ends, and `shared_seed` gives the whole batch one generator and one
repetition history as the reference's batched `generate` does. Serving runs on the engine
(engine.py); this exists to check that the family reproduces the reference's batched goldens.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..layers.batch_context import BatchContext
from ..models.family import Prompt, TalkerFamily
from ..sampling import SamplingParams
from .kv_cache import SlotKVCache
from .request import Generation


@torch.inference_mode()
def generate_static(
    family: TalkerFamily,
    prompts: list[Prompt],
    samplings: list[SamplingParams],
    max_new_frames: int | list[int],
    shared_seed: int | None = None,
) -> list[Generation]:
    """Run `prompts` as one batch for at most `max_new_frames` steps each (one cap or one per prompt).

    `shared_seed` switches to the reference's static-batch randomness (one generator and one
    repetition history for the whole batch); by default every request has its own.
    """
    caps = max_new_frames if isinstance(max_new_frames, list) else [max_new_frames] * len(prompts)
    if min(caps) < 1:
        raise InvalidRequestError(f"max_new_frames must be at least 1, got {min(caps)}")
    backbone = family.backbone_config
    device = next(family.model.parameters()).device
    dtype = next(family.model.parameters()).dtype
    longest = max(len(p.rows) + cap for p, cap in zip(prompts, caps))
    if longest > backbone.max_position_embeddings:
        raise InvalidRequestError(
            f"prompt + new frames = {longest} positions exceeds the model's {backbone.max_position_embeddings}")
    cache = SlotKVCache(backbone.num_hidden_layers, len(prompts), longest, backbone.num_key_value_heads,
                        backbone.head_dim, dtype, device)
    state = family.new_state(len(prompts), device, shared_seed=shared_seed)
    slots = [cache.allocate() for _ in prompts]
    segments: list[list[list[np.ndarray]]] = [
        [[seg] for seg in family.admit(state, s, p, c)] for s, p, c in zip(slots, prompts, samplings)]
    rows: list[list[np.ndarray]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)

    last_hidden = []
    for slot, prompt in zip(slots, prompts):
        prompt_rows = torch.from_numpy(prompt.rows).to(device)[None]
        ctx = BatchContext.build([0], len(prompt.rows), [slot], device)
        last_hidden.append(family.model(prompt_rows, ctx, cache.k, cache.v)[:, -1])
        cache.lengths[slot] = len(prompt.rows)
    hidden = torch.cat(last_hidden)
    running = list(range(len(prompts)))
    for step in range(max(caps)):
        out = family.step(state, hidden, torch.tensor([slots[i] for i in running], device=device))
        finished = out.finished.tolist()
        has_frame, new_segment = out.has_frame.tolist(), out.new_segment.tolist()
        frames, step_rows = out.frames.cpu().numpy(), out.rows.cpu().numpy()
        for row, i in enumerate(running):
            rows[i].append(step_rows[row])
            if has_frame[row]:
                if new_segment[row] or not segments[i]:
                    segments[i].append([])
                segments[i][-1].append(frames[row : row + 1])
            stopped[i] = finished[row]
        keep = [row for row, i in enumerate(running) if not finished[row] and step + 1 < caps[i]]
        running = [running[row] for row in keep]
        if not running:
            break
        starts = [cache.lengths[slots[i]] for i in running]
        ctx = BatchContext.build(starts, 1, [slots[i] for i in running], device)
        hidden = family.model(out.rows[keep][:, None], ctx, cache.k, cache.v)[:, -1]
        for i in running:
            cache.lengths[slots[i]] += 1
    for slot in slots:
        family.release(state, slot)
        cache.release(slot)
    return [
        Generation(
            rows=np.stack(r) if r else np.zeros((0, family.columns), dtype=np.int64),
            frames=np.concatenate([np.concatenate(seg) for seg in segs]).astype(np.int64)
            if segs else np.zeros((0, family.codebooks), dtype=np.int64),
            segment_lengths=[sum(len(f) for f in seg) for seg in segs],
            stopped=s,
            start_length=p.start_length,
        )
        for r, segs, s, p in zip(rows, segments, stopped, prompts)
    ]
