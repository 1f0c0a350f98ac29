"""Ray Serve bench (not a test): routing overhead per request, Ray app vs the direct server, and
throughput with 1 and 2 replicas. Prints one JSON object.

    .venv/bin/python benchmarks/ray_serve.py [--model DIR] [--requests 64] [--concurrency 16]

Each engine (the direct server and every replica) runs with one torch thread, so the figures
compare like with like on a small machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

TEXT = "Routing overhead and throughput."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready")


def speech(client: httpx.Client, seed: int) -> float:
    r = client.post("/v1/audio/speech", json={"input": TEXT, "response_format": "pcm", "seed": seed})
    r.raise_for_status()
    return float(r.headers["x-audio-seconds"])


def latency_ms(url: str, n: int) -> dict:
    """Median wall time of sequential requests: one without engine work, one whole speech request."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(3):  # warm up connections and the engine
            speech(client, i)
        models, whole = [], []
        for i in range(n):
            t = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            models.append(time.perf_counter() - t)
            t = time.perf_counter()
            speech(client, i)
            whole.append(time.perf_counter() - t)
    return {"models_ms": 1000 * statistics.median(models), "speech_ms": 1000 * statistics.median(whole)}


def throughput(url: str, requests: int, concurrency: int) -> dict:
    """Audio seconds per wall second for `requests` speech requests, `concurrency` at a time."""
    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        speech(client, 0)
        t = time.perf_counter()
        audio = sum(pool.map(lambda i: speech(client, i), range(requests)))
        wall = time.perf_counter() - t
    return {"audio_s_per_s": audio / wall, "requests_per_s": requests / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the bundled demo)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=30)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the direct server's torch threads, as a replica's
    with tempfile.TemporaryDirectory(prefix="mossserve-bench-") as data:  # both servers' voice store
        result = measure(args, data)
    print(json.dumps(result, indent=1))


def measure(args: argparse.Namespace, data: str) -> dict:
    """The direct server's figures, then Ray Serve's with one and two replicas."""
    model = ["--model", args.model] if args.model else []
    result: dict = {"requests": args.requests, "concurrency": args.concurrency, "cpus": os.cpu_count()}

    port = free_port()
    direct = subprocess.Popen([sys.executable, "-m", "mossserve.cli", "serve", *model, "--port", str(port),
                               "--data-dir", data, "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        result["direct"] = {**latency_ms(url, args.latency_requests),
                            **throughput(url, args.requests, args.concurrency)}
    finally:
        direct.terminate()
        direct.wait()

    import ray
    from ray import serve

    from mossserve.distributed import RayOptions, build_app
    from mossserve.serve import ServerSettings

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    settings = ServerSettings(model=args.model, data_dir=data)
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    try:
        for replicas in (1, 2):
            serve.run(build_app(settings, RayOptions(replicas=replicas)), name="mossserve", route_prefix="/",
                      logging_config=quiet)
            figures = throughput(url, args.requests, args.concurrency)
            if replicas == 1:
                figures = {**latency_ms(url, args.latency_requests), **figures}
            result[f"ray_{replicas}"] = figures
    finally:
        serve.shutdown()
        ray.shutdown()
    result["load_average_1m"] = os.getloadavg()[0]  # other work on the machine skews every figure
    result["routing_overhead_ms"] = result["ray_1"]["models_ms"] - result["direct"]["models_ms"]
    result["speech_overhead_ms"] = result["ray_1"]["speech_ms"] - result["direct"]["speech_ms"]
    result["speedup_2_replicas"] = result["ray_2"]["audio_s_per_s"] / result["ray_1"]["audio_s_per_s"]
    return result


if __name__ == "__main__":
    main()
