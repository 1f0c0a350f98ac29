"""Realtime sessions through the engine (docs/cli.md session scripts, README §5.4-5.7): the
reference's streaming-session goldens turn by turn, sessions batched together, a session that
gives its slot up and prefills its context again, and the session bookkeeping."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from realtime_cases import REALTIME_DIR, golden, golden_json, realtime_family

from mossserve.cli import main
from mossserve.config import ChunkSchedule, EngineConfig
from mossserve.engine.engine import Engine
from mossserve.engine.request import Status
from mossserve.errors import EngineFullError, InvalidRequestError
from mossserve.sampling import SamplingParams
from mossserve.text.realtime_session import RealtimeTurn, SessionScript

RUNS = golden_json("generation")["runs"]


def codes(name: str) -> list:
    return golden("prompts")[f"codes.{name}"].numpy().tolist()


def pushes(ops: list[dict]) -> dict:
    """A turn's `input` / `input_tokens` from the reference's recorded calls."""
    text = [op["arg"] for op in ops if op["op"] == "push_text"]
    tokens = [op["arg"] for op in ops if op["op"] == "push_text_tokens"]
    return {"input_tokens": tokens} if tokens else {"input": text}


def script(run: str) -> dict:
    """The golden run as a session script (voice and user audio exactly as the reference got them)."""
    r = RUNS[run]
    if run == "stream_multiturn":
        turns = [{"user_text": t["reset_turn"]["user_text"], "user_audio": user, **pushes(t["ops"])}
                 for t, user in zip(r["turns"], [codes("user1"), codes("user2")])]
        return {"voice": np.asarray(codes("voice")).T.tolist(), "turns": turns}
    if run == "stream_text_only_short":
        text = golden_json("prompts")["cases"]["text_only_turn"]["args"]["text"]
        return {"turns": [{"user_text": text, **pushes(r["turns"][0]["ops"])}]}
    if run == "stream_zh_user_short_text":
        t = r["turns"][0]
        return {"voice": codes("voice"), "turns": [{"user_text": t["reset_turn"]["user_text"],
                                                    "user_audio": codes("user_zh"), **pushes(t["ops"])}]}
    assert run == "stream_sampled"
    return {"voice": np.asarray(codes("voice")).T.tolist(),
            "turns": [{"user_text": r["user_text"], "user_audio": codes("user_short"), "input": r["push"]}]}


def turn_frames(run: str) -> list[np.ndarray]:
    """Each turn's frames as the reference session returned them (the EOS frame last)."""
    g = golden("generation")
    return [g[f"{run}.turn{i}.frames"].numpy() for i in range(len(script(run)["turns"]))]


@pytest.mark.parametrize("run", ["stream_multiturn", "stream_text_only_short", "stream_zh_user_short_text"])
def test_session_scripts_replay_the_reference(run: str, tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps(script(run), ensure_ascii=False))
    out = tmp_path / "codes.npy"
    assert main(["say", "--model", str(REALTIME_DIR), "--request", str(path), "--greedy", "--codes-out", str(out)]) == 0
    expected = np.concatenate([f[:-1] for f in turn_frames(run)])  # each turn without its EOS frame
    assert np.array_equal(np.load(out), expected)


def test_a_seeded_session_replays_the_reference_sampled_run(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps(script("stream_sampled")))
    out = tmp_path / "codes.npy"
    seed = str(RUNS["stream_sampled"]["seed"])
    assert main(["say", "--model", str(REALTIME_DIR), "--request", str(path), "--seed", seed,
                 "--codes-out", str(out)]) == 0
    assert np.array_equal(np.load(out), golden("generation")["stream_sampled.turn0.frames"].numpy()[:-1])


def greedy():
    return realtime_family().default_sampling().with_overrides(audio_temperature=0.0)


class Turns:
    """Turn prompts of the golden scripts, and an outbox that keeps each request's generation."""

    def __init__(self) -> None:
        self.fam = realtime_family()
        self.generations: dict[str, object] = {}

    def prompt(self, run: str, index: int):
        s = SessionScript.from_dict(script(run))
        return self.fam.turn_prompt(s.turns[index], index == 0, s.voice)

    def add(self, engine: Engine, run: str, index: int, session: str, request_id: str | None = None):
        rid = request_id or f"{session}/{index}"
        engine.add_request(self.prompt(run, index), greedy(), self.sink, request_id=rid, decode_audio=False,
                           session=session)
        return rid

    def sink(self, chunk) -> None:
        if chunk.final:
            self.generations[chunk.request_id] = chunk.generation

    def frames(self, request_id: str) -> np.ndarray:
        return self.generations[request_id].frames


def test_sessions_run_batched_together() -> None:
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=4))
    a0 = turns.add(engine, "stream_multiturn", 0, "a")
    b0 = turns.add(engine, "stream_zh_user_short_text", 0, "b")
    c0 = turns.add(engine, "stream_text_only_short", 0, "c")
    engine.run_until_idle()
    a1 = turns.add(engine, "stream_multiturn", 1, "a")
    engine.run_until_idle()
    assert np.array_equal(turns.frames(a0), turn_frames("stream_multiturn")[0][:-1])
    assert np.array_equal(turns.frames(a1), turn_frames("stream_multiturn")[1][:-1])
    assert np.array_equal(turns.frames(b0), turn_frames("stream_zh_user_short_text")[0][:-1])
    assert np.array_equal(turns.frames(c0), turn_frames("stream_text_only_short")[0][:-1])
    assert_context(engine, "a", turns.generations[a1])
    stats = engine.stats()
    assert stats["sessions"] == 3 and stats["sessions_holding_slots"] == 3 and stats["running"] == 0


def test_a_session_turn_has_no_offline_step_cap(monkeypatch) -> None:
    """The reference's session runs a turn to its EOS; the offline step cap cut a session
    script's long turn at it. Here the family's cap is far below the golden turn's length."""
    turns = Turns()
    expected = turn_frames("stream_multiturn")[0][:-1]
    monkeypatch.setattr(turns.fam, "max_new_frames", 2)  # the family is shared with other tests
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
    turn = turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    assert len(expected) > 2 and turns.generations[turn].finish_reason == "stop"
    assert np.array_equal(turns.frames(turn), expected)


def assert_context(engine: Engine, session: str, last_turn) -> None:
    """What the session has fed: the reference's context when turn 1's prefill ran, then turn 1's step rows."""
    context = golden("generation")["stream_multiturn.turn1.context_input_ids"].numpy()
    fed = np.concatenate(engine.sessions.by_id[session].context)
    assert np.array_equal(fed[: len(context)], context)
    assert np.array_equal(fed[len(context):], last_turn.rows[:-1])
    assert engine.sessions.by_id[session].fed == len(fed)


def test_a_session_that_gave_its_slot_up_continues_exactly() -> None:
    """One slot: session a's idle slot goes to another request; a's next turn prefills its context again."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
    a0 = turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    other = turns.add(engine, "stream_zh_user_short_text", 0, "b")
    engine.run_until_idle()
    assert engine.stats()["sessions_holding_slots"] == 1  # b now; a gave its slot up
    a1 = turns.add(engine, "stream_multiturn", 1, "a")
    engine.run_until_idle()
    assert np.array_equal(turns.frames(a0), turn_frames("stream_multiturn")[0][:-1])
    assert np.array_equal(turns.frames(other), turn_frames("stream_zh_user_short_text")[0][:-1])
    assert np.array_equal(turns.frames(a1), turn_frames("stream_multiturn")[1][:-1])
    assert_context(engine, "a", turns.generations[a1])


@pytest.mark.parametrize("ending", ["abort", "consumer gone"])
def test_a_turn_cut_short_leaves_the_session_what_its_cache_holds(ending: str) -> None:
    """A turn ended because its consumer raised lost the row its last step fed from the session's
    record (an abort does not): the next turn then heard one row more in its warm slot than after
    giving the slot up and prefilling its context again."""
    def next_turn(give_up: bool) -> np.ndarray:
        turns = Turns()
        engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
        seen = []

        def sink(chunk) -> None:
            if chunk.final:
                return
            seen.append(chunk)
            if ending == "consumer gone" and len(seen) == 4:
                raise RuntimeError("client went away")

        request = engine.add_request(turns.prompt("stream_multiturn", 0), greedy(), sink, request_id="a/0",
                                     decode_audio=False, schedule=ChunkSchedule(1, 1), session="a")
        while not request.status.done:
            if ending == "abort" and len(seen) == 4:
                engine.abort("a/0")
            engine.step()
        assert request.finish_reason == "aborted" and request.steps >= 4
        session = engine.sessions.by_id["a"]
        assert session.fed == engine.runner.cache.lengths[session.slot] == len(np.concatenate(session.context))
        if give_up:
            turns.add(engine, "stream_zh_user_short_text", 0, "b")
            engine.run_until_idle()
            assert session.slot < 0
        turns.add(engine, "stream_multiturn", 1, "a")
        engine.run_until_idle()
        return turns.frames("a/1")

    warm, restored = next_turn(give_up=False), next_turn(give_up=True)
    assert len(warm) > 0 and np.array_equal(warm, restored)


def test_a_turn_queued_for_its_warm_slot_keeps_that_slot_taken() -> None:
    """One slot, held by session a, whose next turn waits to be admitted beside a request that needs a
    slot: the slot is not free (the other request waited for it; it failed allocating before), and
    the turn is not held behind that request (it was, when the count was right, for ever)."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
    turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    other = turns.add(engine, "stream_zh_user_short_text", 0, "b")  # needs a slot; a's is a's
    a1 = turns.add(engine, "stream_multiturn", 1, "a")
    engine.run_until_idle()
    assert np.array_equal(turns.frames(a1), turn_frames("stream_multiturn")[1][:-1])
    assert np.array_equal(turns.frames(other), turn_frames("stream_zh_user_short_text")[0][:-1])
    assert_context(engine, "a", turns.generations[a1])  # a kept its slot: it went on first


def test_a_turn_that_needs_its_slot_back_waits_for_one() -> None:
    """b gave its slot up to a; a's next turn (in a's warm slot) and b's (needing one) are queued
    together: b waits for the slot and continues exactly (its turn failed with no slot before, and
    the failure dropped its session)."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
    turns.add(engine, "stream_multiturn", 0, "b")
    engine.run_until_idle()
    turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    a1 = turns.add(engine, "stream_multiturn", 1, "a")
    b1 = turns.add(engine, "stream_multiturn", 1, "b")
    engine.run_until_idle()
    for rid in (a1, b1):
        assert np.array_equal(turns.frames(rid), turn_frames("stream_multiturn")[1][:-1]), rid
    assert_context(engine, "b", turns.generations[b1])


def test_one_turn_at_a_time_and_closing_frees_the_slot() -> None:
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=2))
    turns.add(engine, "stream_multiturn", 0, "a")
    with pytest.raises(InvalidRequestError, match="already has a turn in flight"):
        turns.add(engine, "stream_multiturn", 1, "a", request_id="again")
    engine.run_until_idle()
    assert engine.stats()["cache_slots_used"] == 1  # the idle session holds its slot
    assert engine.close_session("a") and not engine.close_session("a")
    engine.run_until_idle()
    assert engine.stats()["cache_slots_used"] == 0 and engine.stats()["sessions"] == 0


@pytest.mark.parametrize("threaded", [True, False])
def test_a_new_session_past_max_sessions_is_refused_at_once(threaded: bool) -> None:
    """TTS.run took the session limit for a full queue and waited for room that no one would make
    (threaded: forever; unthreaded: a message about requests that nothing runs)."""
    from concurrent.futures import ThreadPoolExecutor

    from mossserve.api import TTS
    from mossserve.errors import SessionLimitError

    tts = TTS.from_pretrained(REALTIME_DIR, engine_config=EngineConfig(max_sessions=1, threaded=threaded))
    try:
        prompt = tts.talker.turn_prompt(RealtimeTurn(pieces=["Hi there."]), True)
        tts.run([prompt], SamplingParams.greedy(), max_new_frames=3, decode_audio=False, session="a")
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(tts.run, [prompt], SamplingParams.greedy(), 3, False, session="b")
            with pytest.raises(SessionLimitError, match="max_sessions=1"):
                second.result(timeout=120)
        assert tts.close_session("a") and not tts.close_session("a")
        generation, _ = tts.run([prompt], SamplingParams.greedy(), max_new_frames=3, decode_audio=False, session="b")[0]
        assert generation.finish_reason in ("length", "stop")
    finally:
        tts.close()


def test_a_turn_added_after_close_session_starts_a_new_session() -> None:
    """Closed, and a turn of the same id added before the engine steps: it starts a new context (the
    reference's turn 0 again), it does not join the closing session and die with it."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=2))
    turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    assert engine.close_session("a") and not engine.close_session("a")
    again = turns.add(engine, "stream_multiturn", 0, "a", request_id="again")
    engine.run_until_idle()
    assert np.array_equal(turns.frames(again), turn_frames("stream_multiturn")[0][:-1])
    stats = engine.stats()
    assert stats["sessions"] == 1 and stats["cache_slots_used"] == 1  # the new session's slot only


@pytest.mark.parametrize("ending", ["aborted", "stopped"])
def test_a_turn_that_ends_as_its_session_closes_frees_the_slot_once(ending: str) -> None:
    """A socket that goes away closes its session and aborts the turn's stream at once; or the turn
    stops in the step during which the close arrives. Either way its ending comes first and frees the
    slot; the close must not free it again (that raised, and the crash failed every request)."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=2))
    other = turns.add(engine, "stream_text_only_short", 0, "b")
    rid = turns.add(engine, "stream_multiturn", 0, "a")
    for _ in range(3):
        engine.step()
    if ending == "aborted":
        engine.abort(rid)
        engine.close_session("a")
    else:  # what _advance does for a turn that stops in the step the close came during
        engine.close_session("a")
        engine._end(engine._live[rid], Status.FINISHED, "stop")
    engine.run_until_idle()
    assert turns.generations[rid].finish_reason == ("aborted" if ending == "aborted" else "stop")
    assert np.array_equal(turns.frames(other), turn_frames("stream_text_only_short")[0][:-1])  # unharmed
    stats = engine.stats()
    assert stats["sessions"] == 1 and stats["cache_slots_used"] == 1 and stats["failed"] == 0  # b's slot only


def test_a_refused_first_turn_leaves_no_session() -> None:
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1, max_queued=1, max_sessions=1))
    for i in range(2):  # the engine is full: one to run, one queued
        engine.add_request(turns.prompt("stream_text_only_short", 0), greedy(), turns.sink, request_id=f"plain{i}",
                           decode_audio=False)
    with pytest.raises(EngineFullError):
        turns.add(engine, "stream_multiturn", 0, "a")
    assert engine.stats()["sessions"] == 0
    engine.run_until_idle()
    b0 = turns.add(engine, "stream_multiturn", 0, "b")  # max_sessions=1: b is not refused for a's sake
    engine.run_until_idle()
    assert np.array_equal(turns.frames(b0), turn_frames("stream_multiturn")[0][:-1])


def test_closing_a_session_aborts_its_turn_in_flight() -> None:
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=2))
    rid = turns.add(engine, "stream_multiturn", 0, "a")
    engine.step()
    engine.close_session("a")
    engine.run_until_idle()
    assert turns.generations[rid].finish_reason == "aborted"
    assert engine.stats()["cache_slots_used"] == 0


@pytest.mark.parametrize("ending", ["closed", "failed"])
def test_a_queued_turn_that_ends_frees_its_sessions_warm_slot(ending: str, monkeypatch) -> None:
    """The session's next turn is queued (not admitted yet) when the session is closed, or when the
    turn fails (the session cannot go on): the slot the idle session held is freed either way."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=2))
    turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    assert engine.stats()["cache_slots_used"] == 1
    rid = turns.add(engine, "stream_multiturn", 1, "a")
    if ending == "closed":
        engine.close_session("a")
    else:
        monkeypatch.setattr(engine.scheduler, "admit", lambda free, holds: [])  # it stays queued
        engine._crashed(RuntimeError("a bug"))
        monkeypatch.undo()
    engine.run_until_idle()
    assert turns.generations[rid].finish_reason == ("aborted" if ending == "closed" else "error")
    stats = engine.stats()
    assert stats["cache_slots_used"] == stats["sessions"] == stats["live"] == 0
    for i in range(2):  # both slots serve again
        turns.add(engine, "stream_text_only_short", 0, f"new{i}")
    engine.run_until_idle()
    assert all(turns.generations[f"new{i}/0"].finish_reason != "error" for i in range(2))


def test_models_without_sessions_refuse_them(delay_tts) -> None:
    tts = delay_tts("tiny_nvq32")
    from mossserve.speech_request import SpeechRequest

    with pytest.raises(InvalidRequestError, match="does not keep sessions"):
        tts.engine.add_request(tts.prompt(SpeechRequest(input="Hi.")), tts.talker.default_sampling(), print,
                               session="s")


@pytest.mark.parametrize("run", ["stream_multiturn", "stream_zh_user_short_text", "stream_text_only_short"])
def test_text_pushed_while_speaking_replays_the_reference_push_by_push(run: str) -> None:
    """Each push makes the engine produce exactly the frames the reference session produced for it:
    audio starts before the text has finished, and the frames equal the goldens."""
    fam = realtime_family()
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=2))
    s = SessionScript.from_dict(script(run))
    spoke_early = False
    for index, spec in enumerate(RUNS[run]["turns"]):
        handle = engine.add_request(fam.open_turn_prompt(s.turns[index], index == 0, s.voice), greedy(),
                                    lambda chunk: None, decode_audio=False, session="a")
        engine.run_until_idle()
        assert handle.steps == 0  # nothing to say before the text comes
        ops = spec["ops"]
        for k, op in enumerate(ops):
            before = handle.steps
            if op["op"] == "drain(max_steps=1) loop":
                continue  # the engine drains by itself after the end (counted with end_text)
            ended = op["op"] == "end_text"
            assert engine.push_input(handle.id, None if ended else op["arg"], end=ended)
            engine.run_until_idle()
            expected = op["frames"] + (ops[k + 1]["frames_total"] if ended and k + 1 < len(ops) else 0)
            assert handle.steps - before == expected, (k, op)
            spoke_early |= not ended and handle.steps > 0
        assert handle.status.done
        assert np.array_equal(np.stack(handle.frames), turn_frames(run)[index][:-1])
    assert spoke_early or run == "stream_text_only_short"  # that one's 9 ids wait for the end (no 12 pending)
    assert not engine.push_input(handle.id, "more")  # over: no more input


@pytest.mark.parametrize("pieces", [["Fine <|im_", "end|>"], ["Fine <|im", "_", "end|> ok"], ["Fine <", "|im_end|>"]])
def test_a_special_token_spelled_across_pushed_pieces_is_refused(pieces: list[str]) -> None:
    """Each piece alone is plain text; the engine checks where a piece meets the text before it (only
    the websocket did), and the request goes on without the refused piece."""
    from mossserve.errors import InvalidRequestError

    fam = realtime_family()
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=1))
    finals = []
    handle = engine.add_request(fam.open_turn_prompt(RealtimeTurn(user_text="Hello."), True), greedy(),
                                lambda chunk: finals.append(chunk) if chunk.final else None, decode_audio=False,
                                session="a")
    for piece in pieces[:-1]:
        assert engine.push_input(handle.id, piece)
    with pytest.raises(InvalidRequestError, match=r"text contains the special token\(s\) <\|im_end\|>"):
        engine.push_input(handle.id, pieces[-1])
    assert engine.push_input(handle.id, " thanks.", end=True)
    engine.run_until_idle()
    assert finals and finals[0].finish_reason != "error" and handle.steps > 0


def play_pushed(engine: Engine, s: SessionScript, index: int, session: str = "a"):
    """Golden turn `index` of stream_multiturn with its text pushed as the reference session got it."""
    fam = realtime_family()
    handle = engine.add_request(fam.open_turn_prompt(s.turns[index], index == 0, s.voice), greedy(),
                                lambda chunk: None, decode_audio=False, session=session)
    engine.run_until_idle()
    for op in RUNS["stream_multiturn"]["turns"][index]["ops"]:
        if op["op"] != "drain(max_steps=1) loop":
            ended = op["op"] == "end_text"
            engine.push_input(handle.id, None if ended else op["arg"], end=ended)
            engine.run_until_idle()
    return handle


@pytest.mark.parametrize("ending", ["empty text", "cancelled", "text past the cache", "slot given up, cancelled",
                                    "slot given up, cancelled mid-refeed"])
def test_a_turn_that_never_spoke_feeds_nothing(ending: str) -> None:
    """README 5.6: a turn's input goes into the model with its first text (the prefill), so a turn that
    ends before that (no text at all, cancelled while waiting for it, text refused) leaves the context
    as it was: the next turn gives the golden turn 1. The engine prefills a waiting turn's input early
    (for first-audio latency) and takes it back out; a context being fed again into a new slot stays."""
    fam = realtime_family()
    one_slot = ending.startswith("slot given up")
    config = EngineConfig(threaded=False, max_running=1 if one_slot else 2,
                          prefill_tokens=16 if ending.endswith("mid-refeed") else 512)
    engine = Engine(fam, None, config)
    s = SessionScript.from_dict(script("stream_multiturn"))
    first = play_pushed(engine, s, 0)
    fed = engine.sessions.by_id["a"].fed
    if one_slot:  # another session's turn takes the one slot: a keeps its context as rows
        other = Turns()
        other.add(engine, "stream_text_only_short", 0, "b")
        engine.run_until_idle()
        assert engine.sessions.by_id["a"].slot < 0
    finals = {}
    middle = engine.add_request(fam.open_turn_prompt(RealtimeTurn(user_text="Never mind."), False), greedy(),
                                lambda chunk: finals.setdefault(chunk.request_id, chunk) if chunk.final else None,
                                decode_audio=False, session="a")
    if ending.endswith("mid-refeed"):
        engine.step()  # 16 of the context's rows are back in the new slot
        assert 0 < middle.prefilled < fed
    else:
        engine.run_until_idle()
        assert middle.prefilled == middle.prompt_length  # the turn's input waits in the cache
    if ending == "empty text":
        engine.push_input(middle.id, None, end=True)
    elif ending == "text past the cache":
        engine.push_input(middle.id, [1000] * engine.max_len, end=True)
    else:
        engine.abort(middle.id)
    engine.run_until_idle()
    expected_reason = "aborted" if "cancelled" in ending else "error"
    assert finals[middle.id].finish_reason == expected_reason and len(finals[middle.id].generation.rows) == 0
    assert engine.session_context("a") == fed
    last = play_pushed(engine, s, 1)
    assert np.array_equal(np.stack(first.frames), turn_frames("stream_multiturn")[0][:-1])
    assert np.array_equal(np.stack(last.frames), turn_frames("stream_multiturn")[1][:-1])
    assert_context(engine, "a", last.generation(fam.codebooks, fam.columns))


def test_after_a_first_turn_that_never_spoke_the_next_turn_seeds_the_session() -> None:
    """A session that has fed nothing starts afresh: the next turn's seed replays the reference's
    seeded run, whatever seed the cancelled turn had."""
    fam = realtime_family()
    s = SessionScript.from_dict(script("stream_sampled"))
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=2))
    cancelled = engine.add_request(fam.open_turn_prompt(s.turns[0], True, s.voice),
                                   fam.default_sampling().with_overrides(seed=7), lambda chunk: None,
                                   decode_audio=False, session="a")
    engine.run_until_idle()
    engine.abort(cancelled.id)
    engine.run_until_idle()
    assert engine.session_context("a") == 0 and engine.stats()["cache_slots_used"] == 0
    turn = engine.add_request(fam.turn_prompt(s.turns[0], True, s.voice),
                              fam.default_sampling().with_overrides(seed=RUNS["stream_sampled"]["seed"]),
                              lambda chunk: None, decode_audio=False, session="a")
    engine.run_until_idle()
    assert np.array_equal(np.stack(turn.frames), turn_frames("stream_sampled")[0][:-1])


def test_a_turn_whose_context_cannot_be_restored_ends_its_session(monkeypatch) -> None:
    """The slot taken for the restore is given back, and no half-made session remains."""
    turns = Turns()
    engine = Engine(turns.fam, None, EngineConfig(threaded=False, max_running=1))
    turns.add(engine, "stream_multiturn", 0, "a")
    engine.run_until_idle()
    turns.add(engine, "stream_text_only_short", 0, "b")  # takes the one slot: a keeps its context as rows
    engine.run_until_idle()
    engine.close_session("b")
    engine.run_until_idle()

    def broken(*args) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(turns.fam, "restore_session", broken)
    rid = turns.add(engine, "stream_multiturn", 1, "a")
    engine.run_until_idle()
    assert turns.generations[rid].finish_reason == "error"
    stats = engine.stats()
    assert stats["sessions"] == stats["cache_slots_used"] == stats["live"] == 0


def test_a_streamed_turn_is_bounded_by_the_text_pushed_so_far() -> None:
    """The runaway bound of a turn whose text streams in grows with each push (it started from no
    text: 125 frames), and no offline step cap applies: 200 ids in pushes of 5 run to the model's
    own stop, as the same ids in a session script do."""
    fam = realtime_family()
    ids = [int(i) for i in np.random.default_rng(0).integers(1000, 5000, size=200)]
    pieces = [ids[k : k + 5] for k in range(0, len(ids), 5)]
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=2))
    streamed = engine.add_request(fam.open_turn_prompt(RealtimeTurn(user_text="Tell me a long story."), True),
                                  greedy(), lambda chunk: None, decode_audio=False, session="a")
    for piece in pieces:
        engine.push_input(streamed.id, piece)
        engine.run_until_idle()
    engine.push_input(streamed.id, None, end=True)
    engine.run_until_idle()
    whole = engine.add_request(fam.turn_prompt(RealtimeTurn(user_text="Tell me a long story.", token_chunks=pieces), True),
                               greedy(), lambda chunk: None, decode_audio=False, session="b")
    engine.run_until_idle()
    assert streamed.finish_reason == whole.finish_reason == "stop"
    assert len(streamed.frames) > engine.guard.min_frames
    assert np.array_equal(np.stack(streamed.frames), np.stack(whole.frames))


def test_prompt_of_a_session_script_is_its_first_turns_prefill(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps(script("stream_multiturn")))
    out = tmp_path / "prompt.npy"
    assert main(["prompt", "--model", str(REALTIME_DIR), "--request", str(path), "-o", str(out)]) == 0
    assert np.array_equal(np.load(out), golden("generation")["stream_multiturn.turn0.prefill_input_ids"].numpy())


def test_a_later_turn_that_cannot_run_is_named(tmp_path: Path, capsys) -> None:
    """It failed after the earlier turns ran, with a message that did not say which turn."""
    path = tmp_path / "session.json"
    for turn, needle in (({"input": ""}, "turns[1]: the turn's text is empty"),
                         ({"input_tokens": [[5, 10**9]]}, "turns[1]: text ids must be integers in 0.."),
                         ({"input": ["Fine.<|im_", "end|>"]}, "turns[1]: input contains the special token(s) <|im_end|>"),
                         ({"input_tokens": [[5, 151645]]}, "turns[1]: text ids may not be special tokens")):
        path.write_text(json.dumps({"turns": [{"input": "Hello there."}, turn]}))
        code = main(["say", "--model", str(REALTIME_DIR), "--request", str(path), "--greedy", "--codes-out",
                     str(tmp_path / "c.npy")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err


@pytest.mark.parametrize("as_file", [False, True])
def test_a_16_frame_voice_in_a_script_is_time_major(tmp_path: Path, as_file: bool) -> None:
    """Code files are time first (T, 16); a voice of exactly 16 frames (1.28 s, a `say --codes-out`
    file, say) was read transposed by the reference's orientation rule."""
    voice = np.tile(np.asarray(codes("voice")), (3, 1))[:16]  # the golden voice, 7 frames, repeated
    assert voice.shape == (16, 16) and not np.array_equal(voice, voice.T)
    np.save(tmp_path / "voice.npy", voice)
    path = tmp_path / "session.json"
    path.write_text(json.dumps({"voice": "voice.npy" if as_file else voice.tolist(), "turns": [{"input": "Hi."}]}))
    out = tmp_path / "prompt.npy"
    assert main(["prompt", "--model", str(REALTIME_DIR), "--request", str(path), "-o", str(out)]) == 0
    system = realtime_family().builder.system(voice)  # the builder takes (T, 16)
    assert np.array_equal(np.load(out)[: len(system)], system)


def test_a_script_voice_with_more_codebooks_uses_its_first_16(tmp_path: Path) -> None:
    """A time-major (T, 32) voice (a 32-quantizer `codec encode`) was read by the orientation rule
    as its first 16 frames, transposed; the offline path and the socket cut it to 16 codebooks."""
    voice = np.random.default_rng(1).integers(0, 1024, (50, 32))
    prompts = []
    for name, codes_ in (("wide", voice), ("cut", voice[:, :16])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"voice": codes_.tolist(), "turns": [{"input": "Hi."}]}))
        assert main(["prompt", "--model", str(REALTIME_DIR), "--request", str(path), "-o", str(tmp_path / f"{name}.npy")]) == 0
        prompts.append(np.load(tmp_path / f"{name}.npy"))
    assert np.array_equal(prompts[0], prompts[1])
    path = tmp_path / "narrow.json"
    path.write_text(json.dumps({"voice": voice[:, :8].tolist(), "turns": [{"input": "Hi."}]}))
    with pytest.raises(InvalidRequestError, match=r"voice: codes need 16 to 32 codebooks, time first \(T, 16\)"):
        SessionScript.from_json(path)
    np.save(tmp_path / "transposed.npy", voice[:, :16].T)  # the reference's [16, T] saved as a code file
    path.write_text(json.dumps({"voice": "transposed.npy", "turns": [{"input": "Hi."}]}))
    with pytest.raises(InvalidRequestError, match=r"got shape \(16, 50\) \(a .npy file is read time first\)"):
        SessionScript.from_json(path)


def test_a_16_frame_npy_voice_with_32_codebooks_is_time_major(tmp_path: Path) -> None:
    """A `.npy` code file is time-major whatever its shape: a 16-frame voice of 32 codebooks (a
    1.28 s `codec encode`) was read as the reference's [16, T] of 32 frames."""
    voice = np.random.default_rng(2).integers(0, 1024, (16, 32))
    np.save(tmp_path / "voice.npy", voice)
    path = tmp_path / "session.json"
    path.write_text(json.dumps({"voice": "voice.npy", "turns": [{"input": "Hi."}]}))
    out = tmp_path / "prompt.npy"
    assert main(["prompt", "--model", str(REALTIME_DIR), "--request", str(path), "-o", str(out)]) == 0
    system = realtime_family().builder.system(voice[:, :16])
    assert np.array_equal(np.load(out)[: len(system)], system)


def test_an_unthreaded_async_engine_waits_for_a_turns_text(monkeypatch) -> None:
    """A turn whose text comes while it speaks, on an AsyncEngine over an unthreaded engine: when the
    stream has caught up with the text there is nothing to step, and it waits for the next piece (it
    raised "nothing left to run"). The feeder sends each piece once the stream has run dry."""
    import asyncio
    import threading

    from conftest import CODEC_DIR

    from mossserve.api import TTS
    from mossserve.engine.async_engine import AsyncEngine
    from mossserve.sampling import SamplingParams

    tts = TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny", engine_config=EngineConfig(threaded=False))
    dry, step_until, dry_spells = threading.Event(), tts.step_until, []

    def watched(done):
        stepped = step_until(done)
        if not stepped:
            dry_spells.append(1)
            dry.set()
        return stepped

    monkeypatch.setattr(tts, "step_until", watched)

    async def turn() -> list:
        engine = AsyncEngine(tts)
        prompt = tts.talker.open_turn_prompt(RealtimeTurn(user_text="Hi."), True)
        stream = await engine.submit(prompt, SamplingParams.greedy(), decode_audio=False, session="s")

        async def feed() -> None:
            for piece in ["Hello", " there, how", " are you", " today?", None]:
                await asyncio.to_thread(dry.wait)
                dry.clear()
                engine.push_input(stream.request_id, piece, end=piece is None)

        feeder = asyncio.create_task(feed())
        try:
            return [chunk async for chunk in stream]
        finally:  # the feeder has sent everything by the turn's end; if the stream failed, it stops
            feeder.cancel()
            dry.set()

    try:
        chunks = asyncio.run(asyncio.wait_for(turn(), 300))
        assert chunks[-1].final and chunks[-1].finish_reason == "stop" and len(chunks[-1].generation.frames)
        assert len(dry_spells) >= 5
    finally:
        tts.close()


@pytest.mark.parametrize("turn, message", [
    ({"input": None}, r"turns\[0\].input must be a string or a list of strings"),
    ({"input_tokens": None}, r"turns\[0\].input_tokens must be a list of token-id lists"),
    ({"input": "Hi.", "input_tokens": [[3]]}, r"turns\[0\]: give input \(text or its pieces\) or input_tokens"),
])
def test_a_null_text_in_a_script_is_refused_clearly(turn: dict, message: str) -> None:
    """`"input": null` went on to read input_tokens, which was absent: a KeyError (a CLI traceback)."""
    with pytest.raises(InvalidRequestError, match=message):
        SessionScript.from_dict({"turns": [turn]})
