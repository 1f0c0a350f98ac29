"""The shared timer of the matmul benchmarks: the fastest of several runs (the least disturbed by
whatever else the machine runs), after one warm-up call."""
import time


def best(fn, runs: int) -> float:
    fn()
    fastest = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest
