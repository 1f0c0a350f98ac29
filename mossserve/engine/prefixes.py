"""Prompt prefixes shared through the cache: a new plain prompt starts from the keys and values of
its longest prefix that another request holds, or that an ended request left in a free slot.

Requests built from one chat template share most of their rows, and requests with one voice share
its reference audio too, so only the rest is prefilled. Copies are of the same positions' values,
and the copied rows are the same tokens at the same positions, so a request continues from the keys
and values its own prefill would compute (up to the last bits a matmul's batch shape may move, as
in any batched prefill).
"""
from __future__ import annotations

import numpy as np

from ..models.family import Prompt
from .request import EngineRequest, Status
from .talker_runner import TalkerRunner


class PrefixSharing:
    def __init__(self, runner: TalkerRunner, least: int, counts: dict) -> None:
        self.runner = runner
        self.least = least  # the shortest prefix worth sharing; <= 0: off
        self.counts = counts  # the engine's: rows started from copies go to "prompt_rows_reused"

    def kept(self, request: EngineRequest) -> tuple[int | None, int]:
        """The free slot that still holds the longest prefix of a new plain prompt (an ended request
        left it) and that prefix's length; (None, 0) if none does."""
        if request.session is not None:
            return None, 0
        return kept_prefix(self.runner.cache.kept.items(), request.prompt, self.least)

    def share(self, running: list[EngineRequest]) -> frozenset[str]:
        """Give each new prompt among `running` the cached keys and values of its longest prefix that
        another request holds; returns the ids of new prompts to hold for one step because an earlier
        new prompt with the same prefix is prefilled now (they copy it next step). Prefixes kept in
        free slots were taken at admission (`kept`)."""
        if self.least <= 0:
            return frozenset()
        plain = [r for r in running if shares_prefixes(r)]
        fresh = [r for r in plain if r.status is Status.PREFILL and r.prefilled == 0]
        if not fresh:
            return frozenset()
        donors = [(r.slot, r.prompt.rows[: r.prefilled]) for r in plain if r.prefilled > 0]
        held, leaders = set(), []
        for request in fresh:
            rows, limit = request.prompt.rows, request.prompt_length - 1  # the last row is prefilled: its hidden state
            donor, length = _longest_prefix(donors, rows, limit)
            if length >= self.least:
                self.copy(donor, request, length)
                donors.append((request.slot, rows[:length]))
            elif any(min(common_prefix(leader.prompt.rows, rows), limit) >= self.least for leader in leaders):
                held.add(request.id)
            else:
                leaders.append(request)
        return frozenset(held)

    def copy(self, donor: int, request: EngineRequest, length: int) -> None:
        """Start `request` from the first `length` rows that slot `donor` holds."""
        cache = self.runner.cache
        if donor != request.slot:  # a free slot handed back to the request whose prefix it kept: in place
            for table in (cache.k, cache.v):
                table[:, request.slot, :, :length] = table[:, donor, :, :length]
        cache.lengths[request.slot] = length
        request.prefilled = length
        self.counts["prompt_rows_reused"] += length

    def rows_to_keep(self, request: EngineRequest, status: Status) -> np.ndarray | None:
        """The rows whose keys and values an ending plain request leaves in its slot: the prompt rows
        prefilled and every emitted row but the last (each went back in as the next step's input).
        None for a failed request (its last step may have left half-written values)."""
        if status is Status.FAILED or self.least <= 0 or not shares_prefixes(request):
            return None
        fed = request.prompt.rows[: request.prefilled]
        if request.prefilled == request.prompt_length and len(request.rows) > 1:
            fed = np.concatenate([fed, np.stack(request.rows[:-1])])
        return fed if len(fed) >= self.least else None


def plain_prompt(prompt: Prompt) -> bool:
    """Whether a request's cache positions 0.. are its prompt rows 0.. (outside a session): no prompt
    rows added while it runs, no prompt still arriving."""
    return not prompt.later_rows and not prompt.info.get("open")


def shares_prefixes(request: EngineRequest) -> bool:
    """A plain prompt outside a session in the talker, in an allocated slot. Plain as admitted: a
    prompt that grows while it runs (Fish's next text batch) is rebuilt without what made it not plain."""
    return (request.session is None and request.plain and request.slot >= 0
            and request.status in (Status.PREFILL, Status.DECODING))


def kept_prefix(candidates, prompt: Prompt, least: int) -> tuple[int | None, int]:
    """Of (slot, rows) candidates that hold those rows' keys and values, the one sharing the longest
    prefix with a plain `prompt` (never its last row, whose hidden state a step needs) and that
    length; (None, 0) below `least` rows, for a prompt that is not plain, or with `least` <= 0 (off)."""
    if least <= 0 or not plain_prompt(prompt):
        return None, 0
    slot, length = _longest_prefix(candidates, prompt.rows, len(prompt.rows) - 1)
    return (slot, length) if length >= least else (None, 0)


def _longest_prefix(candidates, rows: np.ndarray, limit: int) -> tuple[int | None, int]:
    """The (slot, rows) candidate whose rows share the longest prefix with `rows` (at most `limit`):
    its slot and that length; (None, 0) if none shares a row."""
    best, length = None, 0
    for slot, held in candidates:
        shared = min(common_prefix(held, rows), limit)
        if shared > length:
            best, length = slot, shared
    return best, length


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading rows of a and b are equal."""
    n = min(len(a), len(b))
    differ = np.flatnonzero((a[:n] != b[:n]).any(axis=1))
    return int(differ[0]) if len(differ) else n
