"""`TTS`: the offline Python entry point.

    tts = TTS.from_pretrained("OpenMOSS-Team/MOSS-TTS", device="cuda", dtype="bfloat16")
    codes = tts.generate_codes(SpeechRequest(input="Hello."))      # (frames, n_vq)
    audio = tts.synthesize(SpeechRequest(input="Hello.", voice="me.wav"))

The codec loads lazily: generating codes from codes-only prompts never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidRequestError
from .engine.static_batch import Generation, generate_static
from .models.delay_pattern import split_segments
from .models.family import Prompt, TalkerFamily
from .models.config_utils import read_json
from .models.registry import load_codec, load_talker
from .sampling import SamplingParams
from .speech_request import SpeechRequest

DEMO_MODEL = Path(__file__).parent / "demo" / "moss_tts_tiny"
DEFAULT_MOSS_CODEC = "OpenMOSS-Team/MOSS-Audio-Tokenizer"


@dataclass
class Audio:
    samples: np.ndarray  # float32 (channels, samples)
    sample_rate: int
    codes: np.ndarray  # (frames, codebooks) the audio was decoded from

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


class TTS:
    def __init__(self, talker: TalkerFamily, codec: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        self.talker = talker
        self.device = device
        self.dtype = dtype
        self._codec_source = codec
        self._codec = None

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, codec: str | Path | None = None,
                        device: str = "cpu", dtype: str = "float32") -> "TTS":
        """`model`: a checkpoint directory or hub id (None: the bundled demo checkpoint, noise only).
        `codec`: a codec directory or hub id; by default the one bundled with or named by the model."""
        talker = load_talker(DEMO_MODEL if model is None else model, device=device, dtype=dtype)
        return cls(talker, codec, device=device, dtype=dtype)

    @property
    def is_demo(self) -> bool:
        return self.talker.source == DEMO_MODEL

    @property
    def codec(self):
        """The codec, loaded on first use (see `default_codec`)."""
        if self._codec is None:
            source = self._codec_source or default_codec(self.talker.source)
            self._codec = load_codec(source, device=self.device)
        return self._codec

    # ---- prompts --------------------------------------------------------------------------
    def prompt(self, request: SpeechRequest) -> Prompt:
        return self.talker.build_prompt(request, encode_voice=self.encode_voice)

    def encode_voice(self, path: Path) -> np.ndarray:
        """Reference audio file -> codes (frames, codebooks), prepared as the reference prepares it."""
        from .audio import load_audio
        from .audio.loudness import normalize_loudness

        codec = self.codec
        samples = load_audio(path, codec.sample_rate, channels=codec.channels)
        samples = normalize_loudness(samples)
        with torch.inference_mode():
            wave = torch.from_numpy(samples).to(codec.device)
            codes = codec.encode(wave, n_quantizers=self.talker.codebooks)
        return codes.T.cpu().numpy().astype(np.int64)

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], sampling: SamplingParams | list[SamplingParams] | None = None,
                 max_new_frames: int | None = None) -> list[Generation]:
        samplings = sampling if isinstance(sampling, list) else [sampling or self.talker.default_sampling()] * len(prompts)
        cap = self.talker.max_new_frames if max_new_frames is None else max_new_frames
        limit = self.talker.backbone_config.max_position_embeddings
        caps = [min(cap, limit - len(p.rows)) for p in prompts]
        for p, c in zip(prompts, caps):
            if c < 1:
                raise InvalidRequestError(f"prompt of {len(p.rows)} positions leaves no room to generate (limit {limit})")
        return generate_static(self.talker, prompts, samplings, caps)

    def generate_codes(self, request: SpeechRequest, sampling: SamplingParams | None = None,
                       max_new_frames: int | None = None) -> np.ndarray:
        """The frames the reference hands to its codec, (frames, codebooks) int64."""
        return self.generate([self.prompt(request)], sampling, max_new_frames)[0].frames

    def synthesize(self, request: SpeechRequest, sampling: SamplingParams | None = None,
                   max_new_frames: int | None = None) -> Audio:
        return self.decode(self.generate([self.prompt(request)], sampling, max_new_frames)[0])

    def decode(self, generation: Generation) -> Audio:
        """Each audio segment decoded on its own; in continuation the prefix is cut off, as the reference does."""
        codec = self.codec
        pieces = []
        with torch.inference_mode():
            for index, segment in enumerate(split_segments(generation.frames, generation.segment_lengths)):
                wave = codec.decode(torch.from_numpy(segment.T.copy()).to(codec.device)).float().cpu().numpy()
                if index == 0 and generation.start_length > 0:
                    ratio = min(generation.start_length / len(segment), 1.0)
                    wave = wave[:, int(wave.shape[-1] * ratio):]
                pieces.append(wave)
        samples = np.concatenate(pieces, axis=-1) if pieces else np.zeros((codec.channels, 0), dtype=np.float32)
        return Audio(samples=samples.astype(np.float32), sample_rate=codec.sample_rate, codes=generation.frames)


def default_codec(model_dir: Path | None) -> str | Path:
    """A `codec/` directory inside the model, else the codec its processor_config.json names
    (`audio_tokenizer_name_or_path`, top level or under `audio_tokenizer`, as the reference
    processor reads it), else the published MOSS-Audio-Tokenizer."""
    if model_dir is None:
        return DEFAULT_MOSS_CODEC
    bundled = Path(model_dir) / "codec"
    if (bundled / "config.json").is_file():
        return bundled
    processor = Path(model_dir) / "processor_config.json"
    if processor.is_file():
        config = read_json(processor)
        nested = config.get("audio_tokenizer")
        named = (nested.get("audio_tokenizer_name_or_path") if isinstance(nested, dict) else None) or config.get(
            "audio_tokenizer_name_or_path")
        if named:
            return named
    return DEFAULT_MOSS_CODEC
