"""First audio of new texts in one cloned voice, one request after another on a warm engine: the
case that prefixes kept in free slots speed up (docs/performance.md). The voice is random codes of
SECONDS seconds; the bench Delay checkpoint is built (once) if it is missing. Prints each
request's TTFA and the median of all but the first (which has nothing kept yet). Run it against an
older tree with PYTHONPATH set to that tree's copy, from a directory other than the checkout.

    .venv/bin/python benchmarks/voice_ttfa.py [SECONDS]
"""
import statistics
import sys

import numpy as np

from mossserve.api import TTS
from mossserve.bench.engine import TEXTS, _bench_checkpoint, _time_first_audio
from mossserve.config import EngineConfig
from mossserve.engine.engine import Engine
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
tts = TTS.from_pretrained(_bench_checkpoint(0, print))
voice = np.random.default_rng(0).integers(0, 1024, size=(int(seconds * tts.codec.frame_rate), tts.talker.codebooks))
prompts = [tts.prompt(SpeechRequest(input=text, voice=voice)) for text in TEXTS[:8]]
engine = Engine(tts.talker, lambda: tts.codec, EngineConfig(max_running=4))
engine.start()


def submit(engine, prompt, cap, sink, schedule=None):
    return engine.add_request(prompt, SamplingParams.greedy(), sink, max_new_frames=cap, decode_audio=True, guard=False)


try:
    times = []
    for prompt in prompts:
        engine.wait_idle()
        times.append(_time_first_audio(engine, submit, prompt, 80))
finally:
    engine.shutdown()
print(f"prompt rows {len(prompts[0].rows)}; TTFA per request (s): {', '.join(f'{t:.3f}' for t in times)}; "
      f"median after the first: {statistics.median(times[1:]):.3f}")
