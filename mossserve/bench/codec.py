"""Streaming-decode throughput of the codec: 32 concurrent streams batched vs one at a time.

Both runs stream: every stream is decoded chunk by chunk with the multi-stream decoder, with the
same chunks; the batched run decodes all streams that have a chunk ready in one call (chunk sizes
differ within a call, streams start at different steps), the sequential run decodes each stream
alone (batch 1), one after the other. Throughput = decoded audio seconds / wall seconds, each
mode timed `repeats` times and the fastest kept (the CPU may be shared with other work).

Default checkpoint ("bench size"): a random codec written in the published on-disk format and
loaded through the real loader. It keeps the released structure (patch 240 then three patch-2
stages each way, RLFQ 32 x 1024 x 8, 10 s attention windows = 125/250/500/1000 decoder tokens,
head dim 64) and its proportions at about a tenth of the width and an eighth of the depth:
Transformer widths 128 at 12.5 Hz and 64 elsewhere (released 1280 / 768), depths 4 and 2
(released 32 / 12); 2.5 M parameters against 1.6 B, so both runs take a few seconds on a 2-core
CPU. Weights follow the fixture recipe (fixture README 2) from a fixed seed: every run builds
the same checkpoint. On a CPU the ratio shrinks as the model grows (batch 1 stops being
overhead-bound): a 9 M variant with 128-wide 100 Hz stages measured about 3x on this machine.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..loader import parse_device
from ..models.codecs.moss_audio_tokenizer import MossAudioTokenizer
from ..models.codecs.moss_audio_tokenizer_config import MossAudioTokenizerConfig
from ..models.codecs.moss_audio_tokenizer_loader import checkpoint_layout
from ..models.codecs.moss_streaming import MossStreamingDecoder
from ..models.registry import load_codec

CHUNK_SCHEDULE = (2, 4, 8, 12)  # frames per step: a small first chunk for latency, then larger


def _transformer(cin: int, cout: int, d: int, layers: int) -> dict:
    return {"module_type": "Transformer", "input_dimension": cin, "output_dimension": cout, "d_model": d,
            "num_heads": d // 64, "num_layers": layers, "dim_feedforward": 4 * d, "causal": True,
            "norm": "layer_norm", "positional_embedding": "rope", "max_period": 10000, "gating": "none",
            "layer_scale": 0.01, "conv_layout": True}


def _patch(h: int) -> dict:
    return {"module_type": "PatchedPretransform", "patch_size": h}


def bench_config() -> dict:
    """config.json of the bench-size codec (released structure and proportions, see above)."""
    encoder = [_patch(240), _transformer(240, 32, 64, 2), _patch(2), _transformer(64, 32, 64, 2), _patch(2),
               _transformer(64, 64, 64, 2), _patch(2), _transformer(128, 128, 128, 4)]
    decoder = [_transformer(128, 128, 128, 4), _patch(2), _transformer(64, 64, 64, 2), _patch(2),
               _transformer(32, 64, 64, 2), _patch(2), _transformer(32, 240, 64, 2), _patch(240)]
    return {"model_type": "moss-audio-tokenizer", "sampling_rate": 24000, "downsample_rate": 1920,
            "causal_transformer_context_duration": 10.0, "encoder_kwargs": encoder, "decoder_kwargs": decoder,
            "quantizer_type": "rlfq", "code_dim": 128,
            "quantizer_kwargs": {"input_dim": 128, "rvq_dim": 64, "output_dim": 128, "num_quantizers": 32,
                                 "codebook_size": 1024, "codebook_dim": 8, "quantizer_type": "rlfq"}}


def write_random_checkpoint(directory: Path, config: dict, seed: int = 0) -> Path:
    """config.json + model.safetensors with published names and seeded random weights."""
    with torch.device("meta"):
        layout = checkpoint_layout(MossAudioTokenizer(MossAudioTokenizerConfig.from_dict(config)))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(layout):
        shape = layout[name].shape
        if name.endswith("original0"):  # weight-norm magnitude
            t = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith(".scale"):
            t = 0.2 + 0.4 * torch.rand(shape, generator=gen)
        elif ".norm" in name:  # LayerNorm weight / RMS alpha 1 + 0.1 N, bias 0.05 N
            gain = name.endswith(("weight", "alpha"))
            t = (1.0 if gain else 0.0) + (0.1 if gain else 0.05) * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("original1", "codebook.weight")):
            t = torch.randn(shape, generator=gen)
        else:  # Linear
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        tensors[name] = t.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, directory / "model.safetensors")
    return directory


def chunk_plan(frames: int) -> list[int]:
    """Chunk sizes of one stream: the schedule, then its last size until the frames run out."""
    sizes: list[int] = []
    while sum(sizes) < frames:
        sizes.append(min(CHUNK_SCHEDULE[min(len(sizes), len(CHUNK_SCHEDULE) - 1)], frames - sum(sizes)))
    return sizes


def decode_batched(decoder: MossStreamingDecoder, codes: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
    """All streams through one decoder; at each step every started, unfinished stream sends its
    next chunk, so one call mixes first chunks (2 frames) with later ones (12)."""
    plans = [chunk_plan(c.shape[1]) for c in codes]
    ids = [decoder.open() for _ in codes]
    outs: list[list[torch.Tensor]] = [[] for _ in codes]
    step = 0
    while any(len(o) < len(p) for o, p in zip(outs, plans)):
        call = [i for i in range(len(codes)) if starts[i] <= step and len(outs[i]) < len(plans[i])]
        if call:
            chunks = [_next_chunk(codes[i], plans[i], len(outs[i])) for i in call]
            for i, out in zip(call, decoder.decode([ids[i] for i in call], chunks)):
                outs[i].append(out)
                if len(outs[i]) == len(plans[i]):
                    decoder.close(ids[i])
        step += 1
    return [torch.cat(o, -1) for o in outs]


def decode_sequential(decoder: MossStreamingDecoder, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same chunks, one stream at a time (batch 1), one stream after the other."""
    results = []
    for c in codes:
        sid, plan = decoder.open(), chunk_plan(c.shape[1])
        results.append(torch.cat([decoder.decode([sid], [_next_chunk(c, plan, j)])[0] for j in range(len(plan))], -1))
        decoder.close(sid)
    return results


def _next_chunk(codes: torch.Tensor, plan: list[int], j: int) -> torch.Tensor:
    start = sum(plan[:j])
    return codes[:, start: start + plan[j]]


def run_codec_bench(streams: int = 32, seconds: float = 4.0, checkpoint: str | Path | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                    repeats: int = 3) -> dict:
    """Decode `streams` random code streams of `seconds` each, batched and one at a time."""
    parse_device(device)  # a wrong device fails with a sentence, before the random codec is built
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            source = write_random_checkpoint(Path(tmp) / "codec", bench_config(), seed)
            codec = MossAudioTokenizer.from_pretrained(source, device=device, dtype=dtype)
        else:  # any codec behind the seam: a MOSS-Audio-Tokenizer or a Fish S2 Pro directory
            codec = load_codec(checkpoint, device=device, dtype=dtype)
    return {
        "benchmark": "codec streaming decode",
        "codec": "bench-size random MOSS-Audio-Tokenizer" if checkpoint is None else str(checkpoint),
        "parameters": sum(p.numel() for p in codec.parameters()),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **streaming_figures(codec, streams, seconds, seed, repeats),
    }


def streaming_figures(codec, streams: int, seconds: float, seed: int = 0, repeats: int = 3) -> dict:
    """A loaded codec's streaming decode of `streams` random streams, batched vs one at a time."""
    device = codec.device
    frames = max(1, round(seconds * codec.frame_rate))
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, codec.codebook_size, (codec.num_quantizers, frames), generator=gen).to(device)
             for _ in range(streams)]
    starts = [i % len(CHUNK_SCHEDULE) for i in range(streams)]  # streams join at different steps
    # Decoders live as long as the engine: build them and touch their state before timing.
    many = codec.streaming_decoder(streams, max(CHUNK_SCHEDULE))
    one = codec.streaming_decoder(1, max(CHUNK_SCHEDULE))
    decode_batched(many, [c[:, :6] for c in codes], [0] * streams)
    decode_sequential(one, [codes[0][:, :6]])

    def timed(run, decoder, *args) -> tuple[float, list[torch.Tensor]]:
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = run(decoder, codes, *args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, out

    t_batched, out_b = timed(decode_batched, many, starts)
    t_seq, out_s = timed(decode_sequential, one)
    audio_s = streams * frames / codec.frame_rate
    return {
        "streams": streams,
        "audio_seconds_per_stream": frames / codec.frame_rate,
        "chunk_schedule_frames": list(CHUNK_SCHEDULE),
        "repeats": repeats,
        "batched_wall_s": t_batched,
        "sequential_wall_s": t_seq,
        "batched_audio_s_per_s": audio_s / t_batched,
        "sequential_audio_s_per_s": audio_s / t_seq,
        "speedup": t_seq / t_batched,
        "max_abs_diff_batched_vs_sequential": max((a - b).abs().max().item() for a, b in zip(out_b, out_s)),
    }
