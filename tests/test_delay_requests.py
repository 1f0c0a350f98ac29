"""SpeechRequest -> Delay conversation: each task gives the goldens' prompt matrix; bad requests are refused."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mossserve import Speaker, SpeechRequest
from mossserve.errors import InvalidRequestError
from mossserve.models.moss_delay_config import MossDelayConfig
from mossserve.text.delay_prompt import DelayPromptBuilder, build_assistant_message, build_user_message
from mossserve.text.delay_requests import delay_conversation, infer_task
from mossserve.text.tokenizer import TextTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = TextTokenizer.from_dir(FIXTURES / "moss_tokenizer")
WAV = FIXTURES / "audio" / "reference_zh.wav"


class Golden:
    """The processor goldens of one n_vq."""

    def __init__(self, n: int):
        self.n = n
        self.builder = DelayPromptBuilder(
            TOKENIZER, MossDelayConfig.from_file(FIXTURES / "moss_tts_delay" / f"tiny_nvq{n}" / "config.json")
        )
        data = json.loads((FIXTURES / "moss_tokenizer" / f"prompts_nvq{n}.json").read_text(encoding="utf-8"))
        self.cases = {c["id"]: c for c in data["cases"]}
        self.arrays = np.load(FIXTURES / "moss_tokenizer" / f"prompts_nvq{n}.npz")

    def fields(self, case_id: str, message: int = 0) -> dict:
        return self.cases[case_id]["conversations"][0][message]["fields"]

    def codes(self, case_id: str, key: str) -> np.ndarray:
        return self.arrays[f"{case_id}/{key}"]

    def matrix(self, case_id: str) -> np.ndarray:
        return self.arrays[f"{case_id}/input_ids"][0]

    def prompt(self, request: SpeechRequest, task: str | None = None, encode_voice=None) -> tuple[np.ndarray, str]:
        conversation, mode = delay_conversation(
            request, n_vq=self.n, audio_vocab_size=1024, task=task, encode_voice=encode_voice
        )
        return self.builder.build(conversation, mode=mode), mode


G32, G16 = Golden(32), Golden(16)


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_tts_plain_and_language(g):
    for case_id in ("zh_plain", "en_plain", "pinyin", "ipa", "pause_marker", "en_long_multiparagraph"):
        matrix, mode = g.prompt(SpeechRequest(input=g.fields(case_id)["text"]))
        assert mode == "generation"
        np.testing.assert_array_equal(matrix, g.matrix(case_id), err_msg=case_id)
    fields = g.fields("language_tag_french")
    matrix, _ = g.prompt(SpeechRequest(input=fields["text"], language=fields["language"]))
    np.testing.assert_array_equal(matrix, g.matrix("language_tag_french"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_tts_clone(g):
    voice = g.codes("clone_zh", "conv0.msg0.reference0")
    matrix, mode = g.prompt(SpeechRequest(input=g.fields("clone_zh")["text"], voice=voice))
    assert mode == "generation"
    np.testing.assert_array_equal(matrix, g.matrix("clone_zh"))
    # an audio voice goes through the codec
    calls = []
    matrix, _ = g.prompt(SpeechRequest(input=g.fields("clone_zh")["text"], voice=str(WAV)),
                         encode_voice=lambda path: calls.append(path) or voice)
    assert calls == [WAV]
    np.testing.assert_array_equal(matrix, g.matrix("clone_zh"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_tts_duration(g):
    fields = g.fields("duration_tokens")
    assert fields["tokens"] == 325
    for request in (SpeechRequest(input=fields["text"], duration_tokens=325),
                    SpeechRequest(input=fields["text"], duration_seconds=26.0)):
        np.testing.assert_array_equal(g.prompt(request)[0], g.matrix("duration_tokens"))
    fields = g.fields("clone_tokens_language")
    request = SpeechRequest(input=fields["text"], voice=g.codes("clone_tokens_language", "conv0.msg0.reference0"),
                            duration_tokens=fields["tokens"], language=fields["language"])
    np.testing.assert_array_equal(g.prompt(request)[0], g.matrix("clone_tokens_language"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_tts_continuation_clone(g):
    voice = g.codes("continuation_clone", "conv0.msg0.reference0")
    np.testing.assert_array_equal(voice, g.codes("continuation_clone", "conv0.msg1.codes0"))
    text = g.fields("continuation_clone")["text"]
    transcript = "But I really can't complain about not having a normal college experience to you."
    assert text.startswith(transcript + " ")
    new_text = text[len(transcript) + 1 :]
    for mode in (None, "continuation"):
        matrix, built_mode = g.prompt(SpeechRequest(input=new_text, voice=voice, reference_text=transcript, mode=mode))
        assert built_mode == "continuation"
        np.testing.assert_array_equal(matrix, g.matrix("continuation_clone"))
    # the transcript may also be part of the input already
    matrix, _ = g.prompt(SpeechRequest(input=text, voice=voice, mode="continuation"))
    np.testing.assert_array_equal(matrix, g.matrix("continuation_clone"))


def test_tts_continuation_chinese_join():
    """'transcript text' joined by a space normalizes to the concatenation the model card builds."""
    text = G32.fields("continuation")["text"]
    transcript = "太阳系八大行星之一。"
    voice = G32.codes("continuation", "conv0.msg1.codes0")
    request = SpeechRequest(input=text[len(transcript):], voice=voice, reference_text=transcript)
    conversation, mode = delay_conversation(request, n_vq=32, audio_vocab_size=1024)
    expected = [build_user_message(text=text, reference=[voice]), build_assistant_message([voice])]
    np.testing.assert_array_equal(G32.builder.build(conversation, mode), G32.builder.build(expected, "continuation"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_dialogue_clone(g):
    r0, r1 = (g.codes("ttsd_dialogue_clone", f"conv0.msg0.reference{k}") for k in (0, 1))
    np.testing.assert_array_equal(g.codes("ttsd_dialogue_clone", "conv0.msg1.codes0"), np.concatenate([r0, r1]))
    speakers = [
        Speaker(voice=r0, reference_text="In short, we embarked on a mission to make things better for everyone."),
        Speaker(voice=r1, reference_text="[S2] The pace of progress there is extraordinary, honestly. They have the researchers and the drive."),
    ]
    dialogue = "[S1] Listen, let's talk business. What's the real scoop? [S2] Well, it is very promising. [S1] Promising. I hate that word."
    assert g.fields("ttsd_dialogue_clone")["text"].endswith(dialogue)
    request = SpeechRequest(input=dialogue, speakers=speakers)
    assert infer_task(request) == "dialogue"
    matrix, mode = g.prompt(request)
    assert mode == "continuation"
    np.testing.assert_array_equal(matrix, g.matrix("ttsd_dialogue_clone"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_dialogue_partial_reference(g):
    r1 = g.codes("ttsd_partial_reference", "conv0.msg0.reference1")
    assert g.cases["ttsd_partial_reference"]["conversations"][0][0]["reference"][0] is None
    text = g.fields("ttsd_partial_reference")["text"]
    transcript = "[S2] The pace of progress there is extraordinary, honestly. They have the researchers and the drive."
    assert text.startswith(transcript + " ")
    request = SpeechRequest(input=text[len(transcript) + 1 :], speakers=[Speaker(), Speaker(r1, transcript)])
    conversation, mode = delay_conversation(request, n_vq=g.n, audio_vocab_size=1024)
    assert mode == "continuation" and conversation[0].reference[0] is None
    expected = [build_user_message(text=text, reference=[None, r1]), build_assistant_message([r1])]
    np.testing.assert_array_equal(g.builder.build(conversation, mode), g.builder.build(expected, "continuation"))
    # the user turn is the golden one (its assistant prefix holds other codes)
    rows = g.cases["ttsd_partial_reference"]["conversations"][0][0]["unified_rows"]
    np.testing.assert_array_equal(g.builder.build(conversation, mode)[:rows], g.matrix("ttsd_partial_reference")[:rows])


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_dialogue_generation(g):
    text = g.fields("ttsd_generation_no_reference")["text"]
    for request, task in ((SpeechRequest(input=text), "dialogue"),
                          (SpeechRequest(input=text, speakers=[Speaker(), Speaker(), Speaker()]), None)):
        matrix, mode = g.prompt(request, task=task)
        assert mode == "generation"
        np.testing.assert_array_equal(matrix, g.matrix("ttsd_generation_no_reference"))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_voice_design(g):
    for case_id in ("voice_generator_en", "voice_generator_zh"):
        fields = g.fields(case_id)
        request = SpeechRequest(input=fields["text"], instructions=fields["instruction"])
        assert infer_task(request) == "voice_design"
        matrix, mode = g.prompt(request)
        assert mode == "generation"
        np.testing.assert_array_equal(matrix, g.matrix(case_id))


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
def test_sound_effect(g):
    fields = g.fields("sound_effect")
    matrix, mode = g.prompt(SpeechRequest(input=fields["ambient_sound"]), task="sound_effect")
    assert mode == "generation"
    np.testing.assert_array_equal(matrix, g.matrix("sound_effect"))
    fields = g.fields("sound_effect_duration")
    for request in (SpeechRequest(input=fields["ambient_sound"], duration_tokens=fields["tokens"], task="sound_effect"),
                    SpeechRequest(input=fields["ambient_sound"], duration_seconds=10.0, task="sound_effect")):
        np.testing.assert_array_equal(g.prompt(request)[0], g.matrix("sound_effect_duration"))


def test_task_precedence():
    request = SpeechRequest(input="你好。", task="tts")
    assert delay_conversation(request, n_vq=16, audio_vocab_size=1024, task="sound_effect")[0][0].text == "你好。"
    conversation, _ = delay_conversation(SpeechRequest(input="雨声。"), n_vq=16, audio_vocab_size=1024, task="sound_effect")
    assert conversation[0].ambient_sound == "雨声。" and conversation[0].text is None
    assert infer_task(SpeechRequest(input="a")) == "tts"
    assert infer_task(SpeechRequest(input="a", instructions="x", voice=np.zeros((2, 16), dtype=int))) == "tts"


V16 = np.zeros((3, 16), dtype=np.int64)


@pytest.mark.parametrize(
    "request_fields,task,match",
    [
        # fields a task does not use
        ({"input": "a", "instructions": "loud"}, "sound_effect", "instructions is not used by the sound_effect"),
        ({"input": "a", "instructions": "x", "voice": V16}, "voice_design", "voice is not used by the voice_design"),
        ({"input": "a", "speakers": [{"voice": None}]}, "tts", "speakers is not used by the tts"),
        ({"input": "[S1] a", "language": "English"}, "dialogue", "language is not used by the dialogue"),
        ({"input": "[S1] a", "voice": V16}, "dialogue", "speakers"),
        ({"input": "[S1] a", "duration_tokens": 5}, "dialogue", "duration"),
        ({"input": "a", "instructions": "x", "duration_seconds": 1.0}, "voice_design", "duration"),
        ({"input": "a", "reference_text": "b"}, "sound_effect", "reference_text"),
        ({"input": "a", "instructions": "x"}, "tts", "instructions is not used by the tts"),
        ({"input": "a"}, "singing", "task must be one of"),
        ({"input": "a", "task": "karaoke"}, None, "task must be one of"),
        # nothing to say
        ({"input": None}, "tts", "input"),
        ({"input": "   \n\t"}, "tts", "input"),
        ({"input": "\u200b\u200d"}, "tts", "empty after text normalization"),
        ({"input": " ", "voice": V16, "mode": "continuation"}, "tts", "input"),
        ({"input": "  "}, "sound_effect", "sound description"),
        ({"input": ""}, "voice_design", "input"),
        ({"input": "  ", "speakers": [{"voice": None}]}, None, "input"),
        # voice design
        ({"input": "a"}, "voice_design", "needs instructions"),
        ({"input": "a", "instructions": "  "}, "voice_design", "needs instructions"),  # blank is none
        ({"input": "a", "instructions": "x", "mode": "continuation"}, None, "only generation"),
        ({"input": "a", "mode": "continuation"}, "sound_effect", "only generation"),
        # tts modes and voices
        ({"input": "a", "mode": "continuation"}, "tts", "continuation needs a voice"),
        ({"input": "a", "reference_text": "b"}, "tts", "give the voice too"),
        ({"input": "a", "voice": V16, "reference_text": "b", "mode": "generation"}, "tts", "only in continuation"),
        ({"input": "a", "voice": V16, "reference_text": "b", "duration_tokens": 9}, "tts", "duration control"),
        ({"input": "a", "voice": np.zeros((3, 8), dtype=int)}, "tts", "8 codebooks"),
        ({"input": "a", "voice": V16 + 1024}, "tts", "0..1023"),
        ({"input": "a", "voice": V16 - 1}, "tts", "0..1023"),
        ({"input": "a", "voice": str(WAV)}, "tts", "codec"),
        # dialogue
        ({"input": "no tags here"}, "dialogue", "speaker tags"),
        ({"input": "[S1] a [S3] b", "speakers": [{"voice": V16, "reference_text": "x"}, {}]}, None, r"\[S3\]"),
        ({"input": "[S6] a"}, "dialogue", r"\[S6\]"),
        ({"input": "[S1] a", "speakers": [{}] * 6}, None, "at most 5 speakers"),
        ({"input": "[S1] a", "speakers": [{"voice": V16}]}, None, r"speakers\[0\]: give voice and reference_text"),
        ({"input": "[S1] a [S2] b", "speakers": [{}, {"reference_text": "x"}]}, None, r"speakers\[1\]"),
        ({"input": "[S1] a", "speakers": [{"voice": V16, "reference_text": "x"}], "mode": "generation"}, None, "continuation mode"),
        ({"input": "[S1] a", "speakers": [{}], "mode": "continuation"}, None, "at least one speaker with a voice"),
        ({"input": "[S1] a", "speakers": [{"voice": str(WAV), "reference_text": "x"}]}, None, "codec"),
        ({"input": "[S1] a", "speakers": [{"voice": np.zeros((3, 32), dtype=int), "reference_text": "x"}]}, None, "32 codebooks"),
        # speaker tags: [S1]..[Sn] exactly, and a transcript holds its own speaker's tag only
        ({"input": "[S0] a [S1] b"}, "dialogue", r"input uses \[S0\], which is not a speaker tag"),
        ({"input": "[S01] a"}, "dialogue", r"input uses \[S01\].*\[S1\]\.\.\[S5\]"),
        ({"input": "[S1] a [S2] b", "speakers": [{}, {"voice": V16, "reference_text": "[S1] Hello there."}]}, None,
         r"speakers\[1\].reference_text is speaker 2's transcript but holds \[S1\]"),
        ({"input": "[S1] a [S2] b", "speakers": [{"voice": V16, "reference_text": "Hi. [S2] yo"}, {}]}, None,
         r"speakers\[0\].reference_text is speaker 1's transcript but holds \[S2\]"),
        ({"input": "[S1] a", "speakers": [{"voice": V16, "reference_text": "Hi. [S4] yo"}]}, None,
         r"speakers\[0\].reference_text uses \[S4\].*its tags: \[S1\]\)"),
        ({"input": "[S1] a", "speakers": [{"voice": V16, "reference_text": "[S01] Hi."}]}, None,
         r"speakers\[0\].reference_text uses \[S01\]"),
        # look-alikes in another case, spacing or width, beside a real tag or alone
        ({"input": "[S1] hi [s2] yo"}, "dialogue", r"input uses \[s2\], which is not a speaker tag"),
        ({"input": "[s1] hi [s2] yo"}, "dialogue", r"input uses \[s1\], which is not a speaker tag"),
        ({"input": "[S1] hi [S 2] yo"}, "dialogue", r"input uses \[S 2\], which is not a speaker tag"),
        ({"input": "[S1] hi [ S2 ] yo"}, "dialogue", r"input uses \[ S2 \], which is not a speaker tag"),
        ({"input": "[S1]你好［S2］好"}, "dialogue", "input uses ［S2］, which is not a speaker tag"),
        ({"input": "[S2] a", "speakers": [{}, {"voice": V16, "reference_text": "[s2] Hi."}]}, None,
         r"speakers\[1\].reference_text uses \[s2\]"),
        # tags as the normalizer leaves them: a format character inside does not hide one
        ({"input": "[S1] a [S\u200b6] b"}, "dialogue", r"input uses \[S6\]"),
        ({"input": "[S1] a [S\u200b2] b", "speakers": [{"voice": V16, "reference_text": "x"}]}, None,
         r"input uses \[S2\].*its tags: \[S1\]; speakers holds one entry per speaker, \{\} for one without a voice\)"),
        ({"input": "[S1] a [S2] b", "speakers": [{"voice": V16, "reference_text": "hi [S\u00ad2] yo"}, {}]}, None,
         r"speakers\[0\].reference_text is speaker 1's transcript but holds \[S2\]"),
        # a transcript that is its speaker's tag and nothing else
        ({"input": "[S1] a", "speakers": [{"voice": V16, "reference_text": "[S1]"}]}, None,
         r"speakers\[0\].reference_text is empty \(speaker tags aside\)"),
        ({"input": "[S1] a", "speakers": [{"voice": V16, "reference_text": " [S1] \u200b[S1]\n"}]}, None,
         r"speakers\[0\].reference_text is empty \(speaker tags aside\)"),
    ],
)
def test_bad_requests(request_fields, task, match):
    request = SpeechRequest(**request_fields)  # valid for every family; refused by the Delay mapping
    with pytest.raises(InvalidRequestError, match=match):
        delay_conversation(request, n_vq=16, audio_vocab_size=1024, task=task)


def test_blank_instructions_and_language_ask_for_nothing():
    """As the server reads an OpenAI client's `instructions: ""`; the library refused them on models without them."""
    request = SpeechRequest(input="Hi.", instructions=" ", language="")
    assert request.instructions is None and request.language is None
    conversation, _ = delay_conversation(request, n_vq=16, audio_vocab_size=1024, task="sound_effect")
    assert conversation == delay_conversation(SpeechRequest(input="Hi."), n_vq=16, audio_vocab_size=1024,
                                              task="sound_effect")[0]


def test_a_transcript_may_hold_its_own_tag():
    """Speaker k's transcript with [Sk] (at its start or inside) is not tagged again."""
    speakers = [Speaker(), Speaker(V16, "[S2] Hello there. [S2] Bye.")]
    conversation, _ = delay_conversation(SpeechRequest(input="[S1] Hi.", speakers=speakers), n_vq=16,
                                         audio_vocab_size=1024)
    assert conversation[0].text == "[S2] Hello there. [S2] Bye. [S1] Hi."


def test_speaker_tags_are_judged_as_the_prompt_reads_them():
    """The Delay normalizer unwraps a Markdown link, so "[S6](url)" is no tag in the prompt; the Local
    processor takes text as given, so a tag with a zero-width space inside stays text there."""
    request = SpeechRequest(input="[S1] Hi, see [S6](http://x.com) now.")
    conversation, _ = delay_conversation(request, n_vq=16, audio_vocab_size=1024, task="dialogue")
    assert conversation[0].text == "[S1] Hi, see S6 http://x.com now."
    request = SpeechRequest(input="[S1] a [S\u200b6] b")
    conversation, _ = delay_conversation(request, n_vq=16, audio_vocab_size=1024, task="dialogue", normalize=False)
    assert conversation[0].text == "[S1] a [S\u200b6] b"


def test_codec_output_is_checked():
    request = SpeechRequest(input="a", voice=str(WAV))
    with pytest.raises(InvalidRequestError, match="codebooks"):
        delay_conversation(request, n_vq=16, audio_vocab_size=1024, encode_voice=lambda p: np.zeros((4, 32), dtype=int))


def test_fields_joined_by_the_normalizer_do_not_spell_a_special_token():
    """reference_text and input are normalized together; a typed placeholder spelling in one must not
    pull the other's URL in (it built '<|im_end|>' in the prompt)."""
    voice = G32.codes("continuation_clone", "conv0.msg0.reference0")
    im_end = TOKENIZER.token_to_id("<|im_end|>")

    def im_ends(transcript: str, text: str) -> int:
        matrix, _ = G32.prompt(SpeechRequest(input=text, voice=voice, reference_text=transcript))
        return int((matrix[:, 0] == im_end).sum())

    assert im_ends("Visit http://x<|im_end", "___PROT0___|> goodbye") == im_ends("Visit", "goodbye")


VOICE = np.zeros((5, 32), dtype=np.int64)


@pytest.mark.parametrize("request_fields, task, spelled", [
    # the template fills its fields in turn: a typed "{text}" takes the input's text
    ({"input": "end|>", "language": "<|im_{text}"}, None, "<|im_end|>"),
    ({"input": "start|>", "language": "<|audio_{text}"}, None, "<|audio_start|>"),
    ({"input": "end|>", "instructions": "<|im_{text}"}, "voice_design", "<|im_end|>"),
    ({"input": "io|> x", "language": "<|aud{text}"}, None, "<|audio|>"),
    # transcript and input are normalized as one text: a Markdown link over the join drops its '['
    ({"input": "](http://y) hello", "voice": VOICE, "reference_text": "Visit <|im_[end|>"}, None, "<|im_end|>"),
    ({"input": "](http://y) [S1] hi", "speakers": [Speaker(voice=VOICE, reference_text="Hello <|im_[end|>")]},
     "dialogue", "<|im_end|>"),
])
def test_fields_joined_into_a_special_token_are_refused(request_fields, task, spelled):
    from mossserve.text.delay_prompt import check_joined_fields

    conversation, _ = delay_conversation(SpeechRequest(**request_fields), n_vq=32, audio_vocab_size=1024, task=task)
    with pytest.raises(InvalidRequestError, match=re.escape(f"joins them) contains {'the special token(s) ' * (spelled != '<|audio|>')}{spelled}")):
        check_joined_fields(conversation, TOKENIZER)


@pytest.mark.parametrize("request_fields, task", [
    ({"input": "Hello <there> {text}", "voice": VOICE, "language": "en"}, None),
    ({"input": "hello", "voice": VOICE, "reference_text": "Visit [the site](http://y)"}, None),
    ({"input": "Hi", "instructions": "calm {text}"}, "voice_design"),
    ({"input": "[S1] hi [S2] yo", "speakers": [Speaker(voice=VOICE, reference_text="Hello"), Speaker()]}, "dialogue"),
])
def test_fields_that_join_into_plain_text_pass(request_fields, task):
    from mossserve.text.delay_prompt import check_joined_fields

    conversation, _ = delay_conversation(SpeechRequest(**request_fields), n_vq=32, audio_vocab_size=1024, task=task)
    check_joined_fields(conversation, TOKENIZER)


@pytest.mark.parametrize("g", [G32, G16], ids=["nvq32", "nvq16"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\n\n"], ids=["lf", "crlf", "blank-line"])
def test_a_dialogue_one_turn_per_line_is_read_as_one_line(g, newline):
    """The TTSD app's layout: its clean-up first makes line breaks spaces; the normalizer alone ends
    each line with 。 ("Hello.。[S2] ...")."""
    text = g.fields("ttsd_generation_no_reference")["text"]
    turns = [turn for turn in re.split(r" ?(?=\[S\d\])", text) if turn]
    assert len(turns) > 1
    matrix, _ = g.prompt(SpeechRequest(input=newline.join(turns)), task="dialogue")
    np.testing.assert_array_equal(matrix, g.matrix("ttsd_generation_no_reference"))
    r0, r1 = (g.codes("ttsd_dialogue_clone", f"conv0.msg0.reference{k}") for k in (0, 1))
    transcript = "In short, we embarked on a mission to make things better for everyone."
    speakers = [Speaker(voice=r0, reference_text=transcript.replace(", ", f",{newline}")),
                Speaker(voice=r1, reference_text="[S2] The pace of progress there is extraordinary, honestly. "
                                                 "They have the researchers and the drive.")]
    dialogue = f"[S1] Listen, let's talk business. What's the real scoop?{newline}[S2] Well, it is very promising." \
               f"{newline}[S1] Promising. I hate that word."
    matrix, _ = g.prompt(SpeechRequest(input=dialogue, speakers=speakers))
    np.testing.assert_array_equal(matrix, g.matrix("ttsd_dialogue_clone"))
