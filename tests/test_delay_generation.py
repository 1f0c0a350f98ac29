"""Generation parity of the Delay family with the reference's `generate`, and batch invariance."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DELAY_DIR, load_delay_model
from delay_cases import generation_cases
from mossserve.engine.static_batch import generate_static
from mossserve.errors import InvalidRequestError
from mossserve.models.delay_pattern import dedelay, segments
from mossserve.models.moss_delay_family import MossDelayFamily
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest

PAD_TEXT, PAD_CODE = 151643, 1024
CHECKPOINTS = ["tiny_nvq32", "tiny_nvq16"]


def family(checkpoint: str) -> MossDelayFamily:
    return MossDelayFamily(load_delay_model(DELAY_DIR / checkpoint), tokenizer=None)


def all_cases():
    return [(c, case.name) for c in CHECKPOINTS for case in generation_cases(DELAY_DIR / c)]


def get_case(checkpoint: str, name: str):
    return next(c for c in generation_cases(DELAY_DIR / checkpoint) if c.name == name)


@pytest.mark.parametrize("checkpoint,name", all_cases())
def test_generation_matches_reference(checkpoint: str, name: str) -> None:
    """Greedy and seeded cases: every row, the returned ids, de-delayed codes and segments."""
    fam = family(checkpoint)
    case = get_case(checkpoint, name)
    batch = len(case.prompts)
    prompts = [fam.prompt_from_rows(p) for p in case.prompts]
    shared = case.seed if batch > 1 and case.seed is not None else None
    results = generate_static(fam, prompts, [case.sampling] * batch, case.max_new_tokens, shared_seed=shared)
    g = case.golden
    steps = g["new_rows"].shape[1]
    assert max(len(r.rows) for r in results) == steps
    padded_rows = []
    for b, result in enumerate(results):
        pad_row = np.array([PAD_TEXT] + [PAD_CODE] * fam.codebooks)
        rows = np.concatenate([result.rows, np.tile(pad_row, (steps - len(result.rows), 1))])
        padded_rows.append(rows)
        assert np.array_equal(rows, g["new_rows"][b]), f"row {b}: first differing step " + str(
            np.nonzero((rows != g["new_rows"][b]).any(1))[0][:1])
        # The reference returns (prompt ++ rows)[start_idx:] in padded coordinates.
        full = np.concatenate([g["prompt_input_ids"][b], rows])
        start_idx = case.pad_lengths[b] + prompts[b].info["start_idx"]
        assert result.start_length == g["output_start_length"][b]
        output_ids = full[start_idx:]
        assert np.array_equal(output_ids, g[f"output_ids_{b}"])
        if len(output_ids) >= fam.codebooks - 1:
            assert np.array_equal(dedelay(output_ids[:, 1:]), g[f"dedelayed_{b}"])
        offline = segments(dedelay(output_ids[:, 1:]), PAD_CODE)
        assert [len(s) for s in offline] == list(g[f"segment_lengths_{b}"])
        if offline:
            assert np.array_equal(np.concatenate(offline), g[f"segments_{b}"])
        # The online de-delay (frames as they complete) gives the same segments.
        assert np.array_equal(result.frames, g[f"segments_{b}"])
        assert result.segment_lengths == list(g[f"segment_lengths_{b}"])
        stop_mask = np.ones(steps, dtype=bool)
        if result.stopped:
            stop_mask[len(result.rows) - 1 :] = False
        assert np.array_equal(np.concatenate([g["prompt_attention_mask"][b], stop_mask]), g["final_attention_mask"][b])


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_batch_invariance(checkpoint: str) -> None:
    """Every fixture request, greedy, in one batch (different lengths, stop steps, modes) equals
    its one-at-a-time result; seeded requests draw from their own generators and match too."""
    fam = family(checkpoint)
    prompts, samplings, caps = [], [], []
    for case in generation_cases(DELAY_DIR / checkpoint):
        for rows in case.prompts:
            prompts.append(fam.prompt_from_rows(rows))
            samplings.append(case.sampling if case.seed is not None else SamplingParams.greedy())
            caps.append(case.max_new_tokens)
    alone = [generate_static(fam, [p], [s], cap)[0] for p, s, cap in zip(prompts, samplings, caps)]
    together = generate_static(fam, prompts, samplings, caps)
    assert len(together) == len(prompts) > 10
    for a, t in zip(alone, together):
        assert np.array_equal(a.rows, t.rows)
        assert np.array_equal(a.frames, t.frames)
        assert a.stopped == t.stopped
    assert len({len(t.rows) for t in together}) > 1, "the batch should hold requests that stop at different steps"


def test_seeded_request_is_reproducible_and_seed_dependent() -> None:
    fam = family("tiny_nvq32")
    case = get_case("tiny_nvq32", "sampled")
    prompt = fam.prompt_from_rows(case.prompts[0])
    first = generate_static(fam, [prompt], [case.sampling], case.max_new_tokens)[0]
    again = generate_static(fam, [prompt], [case.sampling], case.max_new_tokens)[0]
    other = generate_static(fam, [prompt], [case.sampling.with_overrides(seed=case.seed + 1)], case.max_new_tokens)[0]
    assert np.array_equal(first.rows, again.rows)
    assert not np.array_equal(first.rows, other.rows)


def test_per_codebook_settings() -> None:
    """Audio settings given per codebook: all-zero temperatures are greedy; a wrong count is refused."""
    fam = family("tiny_nvq16")
    case = get_case("tiny_nvq16", "tts")
    prompt = fam.prompt_from_rows(case.prompts[0])
    greedy = generate_static(fam, [prompt], [SamplingParams.greedy()], 77)[0]
    per_codebook = SamplingParams(text_temperature=0.0, audio_temperature=[0.0] * 16, audio_top_k=list(range(1, 17)),
                                  audio_top_p=[0.5] * 16, audio_repetition_penalty=[1.0] * 16)
    assert np.array_equal(generate_static(fam, [prompt], [per_codebook], 77)[0].rows, greedy.rows)
    with pytest.raises(InvalidRequestError, match="audio_temperature has 3 values; the model has 16 codebooks"):
        generate_static(fam, [prompt], [SamplingParams(audio_temperature=[1.0, 1.0, 1.0])], 77)


def test_segments_split_on_all_pad_frames() -> None:
    frames = np.array([[1, 2], [PAD_CODE] * 2, [PAD_CODE] * 2, [3, PAD_CODE], [4, 5], [PAD_CODE] * 2])
    runs = segments(frames, PAD_CODE)
    assert [r.tolist() for r in runs] == [[[1, 2]], [[3, PAD_CODE], [4, 5]]]
    assert segments(frames[1:3], PAD_CODE) == []


def test_output_starts_after_the_last_im_start_even_past_the_prompt() -> None:
    """A prompt whose last `<|im_start|>` is its second-to-last row: the reference's output starts
    at that index + 3, after the first generated row, and its frames must skip that row too.
    Here the prompt ends in `<|audio_start|>`, so the skipped row already carries a code."""
    fam = family("tiny_nvq32")
    base = get_case("tiny_nvq32", "tts").prompts[0]
    tail = np.full((2, 33), PAD_CODE)
    tail[:, 0] = [151644, 151652]  # <|im_start|>, <|audio_start|>
    rows = np.concatenate([base, tail])
    prompt = fam.prompt_from_rows(rows)
    assert prompt.start_length == -1
    result = generate_static(fam, [prompt], [SamplingParams.greedy()], 60)[0]
    assert result.rows[0, 1] != PAD_CODE
    output_ids = np.concatenate([rows, result.rows])[prompt.info["start_idx"]:]
    offline = segments(dedelay(output_ids[:, 1:]), PAD_CODE)
    assert offline
    assert np.array_equal(result.frames, np.concatenate(offline))
    assert result.segment_lengths == [len(s) for s in offline]


def test_audio_of_a_prompt_with_a_negative_start_length_is_not_cut(delay_tts) -> None:
    """README 3.8 cuts the first waveform only for start_length > 0: the prompt above (-1) keeps
    every frame's samples (a negative cut kept only the first chunk's last frame)."""
    tts = delay_tts("tiny_nvq32")
    tail = np.full((2, 33), PAD_CODE)
    tail[:, 0] = [151644, 151652]  # <|im_start|>, <|audio_start|>
    prompt = tts.talker.prompt_from_rows(np.concatenate([get_case("tiny_nvq32", "tts").prompts[0], tail]))
    assert prompt.start_length == -1
    generation, audio = tts.run([prompt], SamplingParams.greedy(), 60)[0]
    assert len(generation.frames) > 2
    assert audio.samples.shape[-1] == len(generation.frames) * tts.codec.samples_per_frame


def test_an_unseeded_request_leaves_torchs_global_random_stream_alone(delay_tts) -> None:
    import torch

    tts = delay_tts("tiny_nvq32")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    tts.generate_codes(SpeechRequest(input="Hi."), SamplingParams(), max_new_frames=40)
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_audio_mode_text_draw_has_the_right_distribution() -> None:
    """An unseeded request draws text noise only for the two slot tokens it can choose in audio mode;
    the choice must still follow softmax(logits / temperature) over those two."""
    import torch

    fam = family("tiny_nvq32")
    rows = get_case("tiny_nvq32", "tts").prompts[0]
    n = 4000
    state = fam.new_state(n, torch.device("cpu"))
    sampling = SamplingParams(text_temperature=1.5, text_top_k=50, text_top_p=1.0)
    prompt = fam.prompt_from_rows(rows)
    for slot in range(n):
        fam.admit(state, slot, prompt, sampling)
    assert not state.replay.any()
    ids = fam._slot_ids(torch.device("cpu"))
    hidden = torch.randn(1, fam.backbone_config.hidden_size, generator=torch.Generator().manual_seed(0))
    gap = (fam.model.text_logits(hidden, ids)[0, 1] - fam.model.text_logits(hidden, ids)[0, 0]).item()
    hidden = (hidden * 0.9 / gap).expand(n, -1)  # a logit gap of 0.9: p near 0.35, far from 0 and 1
    slots = torch.arange(n)
    steps = torch.full((n,), 5)
    tokens = fam._sample_text(state, hidden, slots, torch.ones(n, dtype=torch.bool), steps)
    p = torch.softmax(fam.model.text_logits(hidden[:1], ids)[0] / 1.5, dim=-1)[0].item()
    share = (tokens == ids[0]).float().mean().item()
    assert set(tokens.tolist()) <= set(ids.tolist()) and 0.2 < p < 0.5
    assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (share, p)
