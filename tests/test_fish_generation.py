"""Fish S2 Pro generation through the engine against the reference's `generate_long` goldens
(fixtures/fish_s2_pro/README.md sections 6 and 9.1): identical columns for every greedy case, the
multi-batch case as one request that re-prefills its second batch, the seeded sampled case
bit-exact, and all cases in one engine batch equal to their single runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fixed_shape_engine
from fish_cases import FISH_DIR, GEN_CASES, GREEDY, family, gen_case, npz

from mossserve.config import EngineConfig
from mossserve.engine.engine import Engine
from mossserve.engine.request import Generation
from mossserve.errors import InvalidRequestError
from mossserve.speech_request import SpeechRequest


def run(requests: list[tuple], max_running: int = 8, engine: Engine | None = None) -> list[Generation]:
    """(prompt, sampling, cap) each -> generations, all submitted before the first step (to `engine`,
    else a new unthreaded one)."""
    engine = engine or Engine(family(), None, EngineConfig(threaded=False, max_running=max_running))
    results: dict[int, Generation] = {}
    for i, (prompt, sampling, cap) in enumerate(requests):
        def sink(chunk, i=i):
            if chunk.final:
                results[i] = chunk.generation
        engine.add_request(prompt, sampling, sink, max_new_frames=cap, decode_audio=False, guard=False)
    engine.run_until_idle()
    return [results[i] for i in range(len(requests))]


def request(name: str) -> tuple:
    case = gen_case(name)
    return family().prompt_from_rows(case.prompts[0], case.tails()), case.sampling, case.cap


def check(name: str, generation: Generation) -> None:
    case = gen_case(name)
    assert np.array_equal(generation.rows, case.generated), name
    cut = len(generation.rows) == case.cap and generation.finish_reason == "length"
    assert generation.finish_reason == ("length" if name in ("maxlen", "sampled") else "stop")
    codes = np.concatenate(case.codes)
    if cut:  # decision: a cut generation keeps its last frame (the reference drops it)
        assert np.array_equal(generation.frames[:-1], codes)
        assert np.array_equal(generation.frames[-1], case.ys[-1][-1, 1:])
    else:
        assert np.array_equal(generation.frames, codes), name


@pytest.mark.parametrize("name", list(GEN_CASES))
def test_each_case_alone(name: str) -> None:
    check(name, run([request(name)])[0])


def test_all_cases_in_one_engine_batch() -> None:
    names = list(GEN_CASES) * 2  # the seeded case twice: each request has its own generator
    for name, generation in zip(names, run([request(n) for n in names], max_running=len(names))):
        check(name, generation)


def fixed_shape_cases(fam, mode: str) -> None:
    """Every case at once through a runner that pads the slow backbone's step to 1, 4 or 6 rows (6:
    max_running), as the cases end (`mode` static runs that eagerly; graphs replays CUDA graphs)."""
    names = list(GEN_CASES)
    engine = fixed_shape_engine(fam, len(names), mode, (1, 4))
    for name, generation in zip(names, run([request(n) for n in names], engine=engine)):
        check(name, generation)
    assert {size for size, _ in engine.runner._steps} >= {4, 6}  # padded up to a fixed size


def test_static_shape_decode_gives_every_case() -> None:
    fixed_shape_cases(family(), "static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_gives_every_case() -> None:
    from mossserve.models.registry import load_talker

    fam = load_talker(FISH_DIR, device="cuda")
    fixed_shape_cases(fam, "graphs")


def test_later_batch_prompt_is_the_earlier_prompt_its_frames_and_a_tail() -> None:
    """What makes the re-prefill exact: batch 1's prompt starts with batch 0's prompt and batch 0's
    returned frames as fed-back columns [semantic_start + c_0, c_0 .. c_{N-1}]."""
    case, cfg = gen_case("multi_speaker"), family().config
    fed = np.concatenate([cfg.semantic_start + case.codes[0][:, :1], case.codes[0]], axis=1)
    assert np.array_equal(case.prompts[1][: len(case.prompts[0]) + len(fed)], np.concatenate([case.prompts[0], fed]))
    assert len(case.tails()[0]) > 0 and case.tails()[0][0, 0] == cfg.eos_token_id


def test_a_multi_batch_request_leaves_no_prefix_for_others_to_reuse() -> None:
    """Its cache holds [batch 0, its frames, batch 1's tail, ...], not its prompt rows in order: when it
    ends, its slot must not offer them as a prefix. (It did once the next batch's rows were added: a
    matrix of batch 0 and tail 1 then copied the wrong keys and values, and its codes changed.)"""
    case = gen_case("multi_speaker")
    probe = (family().prompt_from_rows(np.concatenate([case.prompts[0], case.tails()[0]])), GREEDY, 20)
    engine = Engine(family(), None, EngineConfig(threaded=False, max_running=1, shared_prefix_rows=16))
    results: dict[str, Generation] = {}
    for rid, (prompt, sampling, cap) in (("multi", request("multi_speaker")), ("probe", probe)):
        engine.add_request(prompt, sampling, lambda c: results.setdefault(c.request_id, c.generation) if c.final else None,
                           request_id=rid, max_new_frames=cap, decode_audio=False, guard=False)
        engine.run_until_idle()
    check("multi_speaker", results["multi"])
    assert engine.counts["prompt_rows_reused"] == 0
    assert np.array_equal(results["probe"].rows, run([probe])[0].rows)


def test_a_batch_begun_with_im_end_is_rewritten_for_the_next_batch() -> None:
    """README 3.4 and 6: batch 1's prompt holds batch 0's codes as a VQ part, so the prefill column
    that was fed back as a plain <|im_end|> is <|semantic:0|> with its codes there. The request's
    batch 1 equals a fresh run of the builder's batch-1 prompt, beside another request too."""
    fam = family()
    cfg = fam.config
    text = "<|speaker:0|>Hello there.<|speaker:1|>Good day to you."
    req = SpeechRequest(input=text, voice=npz("codec_encode")["codes"].T[:100], reference_text="The quick brown fox.",
                        chunk_length=1)
    builder = fam.builder()
    plan = builder.plan(req)
    plain = request("plain")
    generation, beside = run([(fam.build_prompt(req), GREEDY, 64), plain])
    check("plain", beside)
    ends = np.flatnonzero(generation.rows[:, 0] == cfg.eos_token_id)
    assert ends[0] == 0 and len(ends) == 3 and generation.finish_reason == "stop"  # batch 0 began with <|im_end|>
    batch0 = generation.rows[: ends[1] + 1]
    fresh = run([(fam.prompt_from_rows(builder.prompt(plan, 1, [batch0[:-1, 1:]])), GREEDY, 64)])[0]
    assert np.array_equal(generation.rows[ends[1] + 1 :], fresh.rows)


def test_prompt_builder_gives_the_golden_prompt_and_tail() -> None:
    fam, case = family(), gen_case("multi_speaker")
    text = "<|speaker:0|>Good morning! How are you today?<|speaker:1|>I am fine, thanks. And you?"
    prompt = fam.build_prompt(SpeechRequest(input=text, chunk_length=40))
    assert np.array_equal(prompt.rows, case.prompts[0])
    assert len(prompt.info["continuations"]) == 1 and np.array_equal(prompt.info["continuations"][0], case.tails()[0])
    assert prompt.later_rows == len(case.tails()[0])


def test_one_frame() -> None:
    """max_new_tokens=1 crashes the reference; here it returns the one frame."""
    prompt, _, _ = request("plain")
    generation = run([(prompt, GREEDY, 1)])[0]
    assert generation.finish_reason == "length" and len(generation.frames) == 1
    assert np.array_equal(generation.rows[0], gen_case("plain").generated[0])


def test_a_prompt_with_its_later_batches_must_fit() -> None:
    engine = Engine(family(), None, EngineConfig(threaded=False, max_len=50))
    prompt, sampling, _ = request("multi_speaker")
    assert len(prompt.rows) < 50 < len(prompt.rows) + prompt.later_rows
    with pytest.raises(InvalidRequestError, match="positions"):
        engine.add_request(prompt, sampling, lambda chunk: None, decode_audio=False)


def test_bad_prompt_matrix_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="shape"):
        family().prompt_from_rows(np.zeros((3, 4), dtype=np.int64))
    rows = gen_case("plain").prompts[0].copy()
    rows[0, 1] = family().config.codebook_size
    with pytest.raises(InvalidRequestError, match="codes must lie"):
        family().prompt_from_rows(rows)


def test_a_hand_made_prompt_with_a_bad_later_batch_is_refused_when_queued() -> None:
    """The engine checks a prompt it is given (one not from prompt_from_rows), its later batches too."""
    from mossserve.models.family import Prompt

    prompt, sampling, _ = request("multi_speaker")
    tails = [t.copy() for t in prompt.info["continuations"]]
    tails[0][-1, 0] = family().config.slow.vocab_size
    engine = Engine(family(), None, EngineConfig(threaded=False))
    with pytest.raises(InvalidRequestError, match="text ids must lie"):
        engine.add_request(Prompt(rows=prompt.rows, info={"continuations": tails}, later_rows=prompt.later_rows),
                           sampling, lambda chunk: None, decode_audio=False)
    assert not engine.has_work()


def test_batched_fast_ar_rows_do_not_mix() -> None:
    """One slow state repeated with different tokens: each row's frame equals its own single run."""
    fam = family()
    cfg = fam.config
    hidden = torch.randn(1, cfg.slow.hidden_size, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([cfg.semantic_start + 5, cfg.semantic_start + 900, cfg.eos_token_id])
    one = torch.ones(3)
    k = torch.ones(3, dtype=torch.int64)
    with torch.no_grad():
        together = fam._fast(hidden.repeat(3, 1), tokens, one, one, k, None)
        alone = [fam._fast(hidden, tokens[i : i + 1], one[:1], one[:1], k[:1], None) for i in range(3)]
    assert torch.equal(together, torch.cat(alone))
    assert together[2, 0] == 0  # <|im_end|>: c_0 clamps to 0


@pytest.mark.parametrize("first", [True, False])
def test_im_end_stops_only_after_the_first_step(first: bool) -> None:
    """The reference never tests a batch's prefill token for <|im_end|>: it is fed back as a plain
    token and its column's codes are a frame. Later <|im_end|> tokens end the request."""
    fam = family()
    cfg = fam.config
    state = fam.new_state(1, torch.device("cpu"))
    fam.admit(state, 0, fam.prompt_from_rows(gen_case("plain").prompts[0]), GREEDY)
    state.first[0] = first
    mask = fam.mask
    try:
        fam.mask = torch.full_like(mask, float("-inf"))
        fam.mask[cfg.eos_token_id] = 0.0  # only <|im_end|> can win
        with torch.no_grad():
            out = fam.step(state, torch.zeros(1, cfg.slow.hidden_size), torch.tensor([0]))
    finally:
        fam.mask = mask
    assert out.rows[0, 0] == cfg.eos_token_id and out.rows[0, 1] == 0
    assert out.finished.tolist() == [not first] and out.has_frame.tolist() == [first]
    assert not bool(state.first[0])


@pytest.mark.parametrize("name", ["plain", "multi_speaker"])
def test_streamed_audio_equals_the_references_decode(name: str) -> None:
    """Through the engine with streaming decode: the audio of all batches, decoded chunk by chunk
    while the talker runs, equals the reference's one decode of the concatenated codes
    (codec_decode.npz, atol 2e-5 as README 9.6)."""
    from mossserve.api import TTS

    prompt, sampling, cap = request(name)
    tts = TTS(family(), codec=FISH_DIR)
    try:
        generation, audio = tts.run([prompt], sampling, max_new_frames=cap)[0]
    finally:
        tts.close()
    wav = npz("codec_decode")[f"{name}__wav"]
    assert generation.frames.shape[0] * tts.codec.samples_per_frame == wav.shape[-1]
    assert np.abs(audio.samples.reshape(-1) - wav.reshape(-1)).max() <= 2e-5


def test_the_runaway_guard_reads_the_words_not_the_speaker_tags() -> None:
    """Each <|speaker:N|> is 7 text tokens: twenty tagged one-word turns gave the guard the bound of
    200 tokens (250 s), past the request's step cap, so it could never fire."""
    fam = family()
    words = fam.build_prompt(SpeechRequest(input="Yes. " * 20)).info["text_tokens"]
    turns = fam.build_prompt(SpeechRequest(input="".join(f"<|speaker:{i % 2}|>Yes. " for i in range(20))))
    assert turns.info["text_tokens"] <= words + 2  # the words, give or take the joins
