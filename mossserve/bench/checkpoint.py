"""A bench-size random MOSS-TTS (Delay) checkpoint in the published on-disk format (Local and
Realtime: family_checkpoints.py; `bench_checkpoint(family=...)` caches any of the three).

`build_delay_checkpoint` writes what a released Delay checkpoint directory holds: config.json
(the bundled demo's, resized), model.safetensors with the published tensor names (`language_model.*`
of a Qwen3 backbone, `emb_ext.{j}`, `lm_heads.{0..n_vq}`), the demo's real tokenizer files (the
vocabulary and every special-token id are the published ones), and a bench-size random codec in
`codec/` (the codec bench's builder). It loads through the real loader like any checkpoint.

Default ("bench size"): Qwen3 hidden 512, 8 layers, 8 query / 4 KV heads of 64, MLP 1536, n_vq 32,
the full 151,936-token vocabulary: 214 M parameters, of which the text embedding and the text
head hold 156 M (in the released models too the text head is read at every decode step).

Weights are N(0, 0.02) (norm gains 1 + 0.02 N) from one seeded generator, tensors in sorted
name order: every build is byte-identical. Random weights alone would leave audio mode at a
random step (or never enter it), so one residual dimension is reserved as a control channel, as
in the test fixtures' weight surgery (tests/fixtures/moss_tts_delay/README.md, section 4):

1. no layer writes dim 0 (row 0 of every `o_proj` and `down_proj` is zero) and the final norm's
   gain there is 1, so dim 0 of the heads' input has the sign of the current row's embedding;
2. `emb_ext[j][:, 0] = 0`; the text embeddings of `\\n` (the last prompt token), `<|audio_start|>`
   and `<|audio_assistant_gen_slot|>` are +CONTROL on dim 0;
3. text head column 0 is zero except `<|audio_start|>` and `<|audio_assistant_gen_slot|>` (+1)
   and `<|audio_assistant_delay_slot|>` (-1).

So greedy decoding answers the prompt with `<|audio_start|>` and then chooses a gen slot over the
delay slot at every step: each request generates audio until its step cap, the same number of
frames for every request, with frames that follow from the random audio heads.
"""
from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..cache import cache_root
from . import codec as codec_bench

STD = 0.02
CONTROL = 4.0  # dim-0 value of the control embeddings (the other entries are ~0.02)
NEWLINE_ID = 198  # "\n" in the Qwen tokenizer: the generation prompt's last token
RECIPE = "v1"  # bump when the recipe changes: cached checkpoints are keyed by it

BENCH_SIZE = {"hidden": 512, "layers": 8, "intermediate": 1536, "heads": 8, "kv_heads": 4, "head_dim": 64, "n_vq": 32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def demo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "moss_tts_tiny"


def delay_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                 n_vq: int) -> dict:
    """The demo's config.json with the backbone resized (token ids, vocabulary, audio vocabulary kept)."""
    config = json.loads((demo_dir() / "config.json").read_text())
    config["hidden_size"] = hidden
    config["n_vq"] = n_vq
    language = config["language_config"]
    language.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    layer_types=["full_attention"] * layers, max_window_layers=layers)
    return config


def qwen3_layer_shapes(prefix: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                       head_dim: int) -> dict[str, tuple[int, ...]]:
    """Published (Hugging Face Qwen3) tensor name -> shape of `layers` decoder layers under `prefix`."""
    shapes = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int,
                   unit_gain: Callable[[str], bool] = lambda name: name.endswith("norm.weight")) -> dict[str, torch.Tensor]:
    """N(0, STD) tensors drawn in name order from one seeded generator; norm gains (`unit_gain`) around 1."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        t = torch.randn(shape, generator=gen) * STD
        if unit_gain(name):
            t += 1.0
        tensors[name] = t
    return tensors


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> shape for a Delay config (the names the released checkpoints use)."""
    lang = config["language_config"]
    h, vocab = lang["hidden_size"], lang["vocab_size"]
    codes = config["audio_vocab_size"] + 1
    shapes: dict[str, tuple[int, ...]] = {"language_model.embed_tokens.weight": (vocab, h),
                                          "language_model.norm.weight": (h,), "lm_heads.0.weight": (vocab, h)}
    shapes.update(qwen3_layer_shapes("language_model.", lang["num_hidden_layers"], h, lang["intermediate_size"],
                                     lang["num_attention_heads"], lang["num_key_value_heads"], lang["head_dim"]))
    for j in range(config["n_vq"]):
        shapes[f"emb_ext.{j}.weight"] = (codes, h)
        shapes[f"lm_heads.{j + 1}.weight"] = (codes, h)
    return shapes


def random_weights(config: dict, seed: int = 0, control: float = CONTROL) -> dict[str, torch.Tensor]:
    tensors = random_tensors(tensor_shapes(config), seed)
    # The control channel (see the module docstring).
    for name, t in tensors.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            t[0] = 0.0
        elif name.startswith("emb_ext."):
            t[:, 0] = 0.0
    tensors["language_model.norm.weight"][0] = 1.0
    embed, text_head = tensors["language_model.embed_tokens.weight"], tensors["lm_heads.0.weight"]
    for token in (NEWLINE_ID, config["audio_start_token_id"], config["audio_assistant_gen_slot_token_id"]):
        embed[token, 0] = control
    text_head[:, 0] = 0.0
    text_head[config["audio_start_token_id"], 0] = 1.0
    text_head[config["audio_assistant_gen_slot_token_id"], 0] = 1.0
    text_head[config["audio_assistant_delay_slot_token_id"], 0] = -1.0
    return {name: t.contiguous() for name, t in tensors.items()}


def build_delay_checkpoint(directory: str | Path, *, hidden: int = 512, layers: int = 8, intermediate: int = 1536,
                           heads: int = 8, kv_heads: int = 4, head_dim: int = 64, n_vq: int = 32, seed: int = 0,
                           codec_config: dict | None = None, control: float = CONTROL) -> Path:
    """Write a random Delay checkpoint directory (config, weights, tokenizer, codec/); returns it.

    `control`: the control embeddings' dim-0 value. The layers of a wider model grow the residual
    stream more, so the released models' widths need a larger one for the control to stay the
    largest logit (benchmarks/released_width.py)."""
    directory = Path(directory)
    config = delay_config(hidden, layers, intermediate, heads, kv_heads, head_dim, n_vq)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(random_weights(config, seed, control), directory / "model.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_dir() / name, directory / name)
    codec_bench.write_random_checkpoint(directory / "codec", codec_config or codec_bench.bench_config(), seed)
    (directory / "README.md").write_text(
        "Random-weight MOSS-TTS (Delay) checkpoint for `mossserve bench` (noise, not speech); "
        "built by mossserve/bench/checkpoint.py.\n")
    return directory


def family_sizes(family: str) -> dict:
    """The bench size of a family's checkpoint (the builder's keyword arguments)."""
    from .family_checkpoints import LOCAL_BENCH_SIZE, REALTIME_BENCH_SIZE
    from .fish_checkpoint import FISH_BENCH_SIZE

    sizes = {"delay": BENCH_SIZE, "local": LOCAL_BENCH_SIZE, "realtime": REALTIME_BENCH_SIZE, "fish": FISH_BENCH_SIZE}
    if family not in sizes:
        raise ValueError(f"no bench checkpoint for family {family!r}")
    return dict(sizes[family])


def checkpoint_path(seed: int = 0, root: Path | None = None, family: str = "delay", **sizes) -> Path:
    """Where the cache keeps the checkpoint of this family, sizes and seed (built or not); a Delay
    checkpoint's `control` other than the default is part of its name."""
    s = {**family_sizes(family), **sizes}
    if family == "delay":
        control = f"-control{s['control']:g}" if s.get("control", CONTROL) != CONTROL else ""
        name = (f"delay-h{s['hidden']}-l{s['layers']}-nvq{s['n_vq']}-i{s['intermediate']}-q{s['heads']}kv{s['kv_heads']}"
                f"d{s['head_dim']}{control}-seed{seed}-{RECIPE}")
    else:
        name = f"{family}-" + "-".join(f"{k}{v}" for k, v in sorted(s.items())) + f"-seed{seed}-{RECIPE}"
    return (root or cache_root()) / "bench" / name


def build_checkpoint(family: str, directory: str | Path, seed: int = 0, **sizes) -> Path:
    """Write the random bench checkpoint of `family` (delay, local, realtime, fish) into `directory`."""
    from .family_checkpoints import build_local_checkpoint, build_realtime_checkpoint
    from .fish_checkpoint import build_fish_checkpoint

    builders = {"delay": build_delay_checkpoint, "local": build_local_checkpoint, "realtime": build_realtime_checkpoint,
                "fish": build_fish_checkpoint}
    return builders[family](directory, seed=seed, **{**family_sizes(family), **sizes})


def is_complete(path: Path) -> bool:
    """A built bench checkpoint: the talker weights and the codec's (in `codec/`, or beside them for Fish)."""
    codec_files = (path / "codec" / "model.safetensors", path / "codec.safetensors")
    return (path / "model.safetensors").is_file() and any(f.is_file() for f in codec_files)


def bench_checkpoint(seed: int = 0, root: Path | None = None, family: str = "delay", **sizes) -> Path:
    """The bench checkpoint under the cache (`$MOSSSERVE_CACHE` or ~/.cache/mossserve), built once.

    Built into a temporary sibling and renamed into place, so an interrupted build is never used. The
    sibling is made like any directory (the umask's mode, not mkdtemp's 0700), so that a shared
    cache can be read by its other users."""
    target = checkpoint_path(seed, root, family, **sizes)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        build_checkpoint(family, tmp, seed, **sizes)
        try:
            tmp.rename(target)
        except OSError:  # built meanwhile by another process
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
