"""Fish Audio's modded DAC (the S2 Pro codec, 44.1 kHz mono, 2048 samples per frame): the codec seam.

wave -> right-pad to whole frames -> encoder (causal convs, snake, residual units, a windowed
transformer in the last block) -> quantizer (downsample x4, pre transformer, semantic + 9
residual codebooks) -> codes (10, F). Codes -> clamp -> summed code embeddings -> post
transformer -> upsample x4 -> decoder (transposed convs, residual units) -> tanh -> 2048 F
samples. Every stage is causal, so `streaming_decoder()` decodes chunk by chunk with carried
state and equals the offline decode (fish_dac_streaming.py), and long inputs encode and decode
in chunks the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ...errors import InvalidRequestError
from .base import finite_audio, finite_latents
from .fish_dac_config import FishDacConfig, WindowTransformerConfig
from .fish_dac_modules import CausalConv, Sequence, Snake, Streamable, StreamStep, decoder_block, encoder_block
from .fish_dac_quantizer import DownsampleQuantizer
from .fish_dac_transformer import WindowTransformer
from .moss_audio_tokenizer import EncodeOutput

DECODE_CHUNK_FRAMES = 256  # offline decodes longer than this (~12 s) go through the streaming step
ENCODE_CHUNK_FRAMES = 256  # and encodes: the encoder's 44.1 kHz layers hold ~65 MB per second of audio


class Encoder(nn.Module):
    def __init__(self, config: FishDacConfig):
        super().__init__()
        width, blocks = config.encoder_dim, []
        for stride, layers in zip(config.encoder_rates, config.encoder_transformer_layers):
            width *= 2
            transformer = WindowTransformer(WindowTransformerConfig(
                n_layer=layers, n_head=width // config.encoder_head_dim, dim=width, head_dim=config.encoder_head_dim,
                intermediate_size=3 * width, window=config.encoder_window, rope_base=config.encoder_rope_base,
                norm_eps=config.encoder_norm_eps)) if layers else None
            blocks.append(encoder_block(width, stride, transformer))
        self.block = Sequence(CausalConv(1, config.encoder_dim, 7), *blocks, Snake(width), CausalConv(width, width, 3))

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        return self.block(x, step)


class Decoder(nn.Module):
    def __init__(self, config: FishDacConfig):
        super().__init__()
        width, blocks = config.decoder_dim, []
        for stride in config.decoder_rates:
            blocks.append(decoder_block(width, stride))
            width //= 2
        self.model = Sequence(CausalConv(config.latent_dim, config.decoder_dim, 7), *blocks, Snake(width),
                              CausalConv(width, 1, 7))

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        return torch.tanh(self.model(x, step))


class FishDac(nn.Module):
    def __init__(self, config: FishDacConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = DownsampleQuantizer(config)
        self.decoder = Decoder(config)
        for name, module in self.named_modules():
            if isinstance(module, Streamable):
                module.key = name
        self.sample_rate = config.sample_rate
        self.channels = 1
        self.samples_per_frame = config.frame_length
        self.frame_rate = config.sample_rate / config.frame_length
        self.num_quantizers = config.num_quantizers
        # Codes the decoder accepts: the semantic codebook's size; residual codes past their own
        # codebook (the LM's fast vocabulary is this large) are clamped, as the reference does.
        self.codebook_size = config.semantic_codebook_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> FishDac:
        """A Fish model directory (codec.safetensors or codec.pth, codec_config.json optional) or hub id."""
        from .fish_dac_loader import load_fish_dac

        return load_fish_dac(name_or_path, device, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------- encode

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
        """(samples,) or (1, samples) at 44.1 kHz -> codes (n_q, ceil(samples / 2048)) int64."""
        return self.encode_batch([wave], n_quantizers).codes[:, 0]

    @torch.inference_mode()
    def encode_batch(self, waves: list[torch.Tensor], n_quantizers: int | None = None) -> EncodeOutput:
        """Clips of different lengths, zero-padded on the right and encoded together (causal: each
        clip's frames are its own encode's). codes (n_q, B, F), lengths = ceil(samples / 2048)."""
        if not waves:
            raise InvalidRequestError("encode_batch needs at least one clip")
        k = self.quantizers_to_use(n_quantizers)
        clips = [self._as_clip(w)[0] for w in waves]
        lengths = torch.tensor([-(-c.shape[0] // self.samples_per_frame) for c in clips], device=self.device)
        z = self._prequant(self._padded(clips))
        return EncodeOutput(self.quantizer.encode(z, k).transpose(0, 1), lengths, z.float())

    def _prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Padded audio (B, 1, N), whole frames -> the quantizer's input (B, latent, frames). Inputs
        longer than ENCODE_CHUNK_FRAMES run through the streaming step in chunks of that many frames
        (every stage is causal: the same result up to float rounding, with activations bounded)."""
        chunk = ENCODE_CHUNK_FRAMES * self.samples_per_frame
        if x.shape[-1] <= chunk:
            return self.quantizer.prequant(finite_latents(self.encoder(x)))
        state = self._zero_state(x.shape[0], (self.encoder, self.quantizer.downsample, self.quantizer.pre_module))
        pieces = []
        for start in range(0, x.shape[-1], chunk):
            piece = x[:, :, start: start + chunk]
            frames = piece.shape[-1] // self.samples_per_frame
            step = StreamStep(torch.full((x.shape[0],), frames, device=self.device), frames, state)
            pieces.append(self.quantizer.prequant(finite_latents(self.encoder(piece, step)), step))
        return torch.cat(pieces, dim=-1)

    @torch.inference_mode()
    def encoder_out(self, wave: torch.Tensor) -> torch.Tensor:
        """The encoder's output (1, latent, frames * 4) of one clip (an intermediate of encode)."""
        return self.encoder(self._padded([self._as_clip(wave)[0]]))

    @torch.inference_mode()
    def prequant(self, wave: torch.Tensor) -> torch.Tensor:
        """The quantizer's input (1, latent, frames) of one clip (an intermediate of encode)."""
        return self.quantizer.prequant(self.encoder_out(wave))

    def _padded(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """Clips (samples,) -> (B, 1, N) zero-padded on the right to the longest, in whole frames."""
        x = pad_sequence(clips, batch_first=True)[:, None]
        return F.pad(x, (0, -x.shape[-1] % self.samples_per_frame)).to(self.dtype)

    # ---------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
        """Codes (n_q, frames) -> audio (1, frames * 2048) float32. Residual codes past their
        codebook are clamped (the caller's tensor is not changed)."""
        if codes.dim() != 2:
            raise InvalidRequestError(f"expected codes (n_quantizers, frames), got {tuple(codes.shape)}")
        return self.decode_batch(codes[None], n_quantizers)[0]

    @torch.inference_mode()
    def decode_batch(self, codes: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
        """Codes (B, n_q, frames) -> audio (B, 1, frames * 2048). Causal: a clip right-padded with
        any codes decodes to the same audio up to its own length. Inputs longer than
        DECODE_CHUNK_FRAMES run through the streaming step in chunks of that many frames (the
        same audio, with activations bounded: the 44.1 kHz layers of the published decoder
        hold about 1 GB per minute of audio each)."""
        codes = self.checked_codes(codes, n_quantizers)
        B, _, T = codes.shape
        if T <= DECODE_CHUNK_FRAMES:
            return self.decoder(self.dequantize(codes)).float()
        state = self.stream_state(B)
        pieces = []
        for start in range(0, T, DECODE_CHUNK_FRAMES):
            chunk = codes[:, :, start: start + DECODE_CHUNK_FRAMES]
            frames = torch.full((B,), chunk.shape[2], device=self.device)
            pieces.append(self.decode_step(chunk, frames, state))
        return torch.cat(pieces, dim=-1)

    @torch.inference_mode()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Checked codes (B, k, F) -> the decoder's input (B, latent, 4F)."""
        return self.quantizer.dequantize(codes).to(self.dtype)

    def decode_step(self, codes: torch.Tensor, frames: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One streaming call: checked codes (B, k, T) right-padded past `frames` (B,); `state`
        (from `stream_state`, these rows) advances in place. Audio (B, 1, T * 2048), valid up to
        frames * 2048 per row."""
        step = StreamStep(frames, codes.shape[2], state)
        h = self.quantizer.dequantize(codes, step).to(self.dtype)
        return self.decoder(h, step).float()

    def stream_state(self, batch: int) -> dict[str, torch.Tensor]:
        """Zero streaming state of `batch` rows for the decode path."""
        return self._zero_state(batch, (self.quantizer.post_module, self.quantizer.upsample, self.decoder))

    def _zero_state(self, batch: int, parts: tuple[nn.Module, ...]) -> dict[str, torch.Tensor]:
        state = {}
        for part in parts:
            for module in part.modules():
                if isinstance(module, Streamable):
                    for key, (shape, dtype) in module.state_shapes().items():
                        state[key] = torch.zeros(batch, *shape, device=self.device, dtype=dtype or self.dtype)
        return state

    def streaming_decoder(self, max_streams: int, max_chunk_frames: int, n_quantizers: int | None = None):
        """The engine's multi-stream decoder (fish_dac_streaming.FishStreamingDecoder)."""
        from .fish_dac_streaming import FishStreamingDecoder

        return FishStreamingDecoder(self, max_streams, max_chunk_frames, n_quantizers)

    # ---------------------------------------------------------------- checks

    def quantizers_to_use(self, n: int | None) -> int:
        """n checked against the codebooks; None or 0 = all of them."""
        if not n:
            return self.num_quantizers
        if not 1 <= n <= self.num_quantizers:
            raise InvalidRequestError(f"n_quantizers must be in 1..{self.num_quantizers}, got {n}")
        return n

    def checked_codes(self, codes: torch.Tensor, n_quantizers: int | None) -> torch.Tensor:
        """Codes (B, n_q, F) -> their first n_quantizers rows as int64 on the device, or a clear error."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.num_quantizers or codes.shape[2] == 0:
            raise InvalidRequestError(f"expected codes (1..{self.num_quantizers} codebooks, frames >= 1), "
                                      f"got {tuple(codes.shape[1:])}")
        if codes.is_floating_point() or codes.is_complex():
            raise InvalidRequestError("codes must be integers")
        k = codes.shape[1] if n_quantizers is None else self.quantizers_to_use(n_quantizers)
        if k > codes.shape[1]:
            raise InvalidRequestError(f"n_quantizers {k} > the {codes.shape[1]} codebooks given")
        codes = codes[:, :k].to(self.device, torch.long)
        if bool(((codes < 0) | (codes >= self.codebook_size)).any()):
            raise InvalidRequestError(f"codes must lie in 0..{self.codebook_size - 1}")
        return codes

    def _as_clip(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) or (1, samples) -> (1, samples) float32 on the device."""
        if not torch.is_tensor(wave) or not wave.is_floating_point():
            raise InvalidRequestError("audio must be a floating-point tensor")
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2 or wave.shape[0] != 1:
            raise InvalidRequestError(f"expected mono audio (samples,) or (1, samples), got {tuple(wave.shape)}")
        if wave.shape[1] == 0:
            raise InvalidRequestError("audio is empty")
        return finite_audio(wave.to(self.device, torch.float32))
