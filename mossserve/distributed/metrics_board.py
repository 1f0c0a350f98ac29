"""MetricsBoard: every replica's Prometheus metrics in one scrape, each sample labelled `replica`.

Serve routes a scrape of /metrics to one replica, so each replica pushes its rendered metrics
here every PUSH_INTERVAL_S and the scraped replica answers with the board's union. A replica not
heard from for STALE_AFTER_S (it died, or scaled down) drops out of the scrape.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

PUSH_INTERVAL_S = 1.0
STALE_AFTER_S = 3 * PUSH_INTERVAL_S


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class MetricsBoard:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, str]] = {}  # replica -> (monotonic time, metrics text)

    def put(self, replica: str, text: str) -> None:
        self._latest[replica] = (time.monotonic(), text)

    def render(self) -> bytes:
        now = time.monotonic()
        self._latest = {r: (t, text) for r, (t, text) in self._latest.items() if now - t < STALE_AFTER_S}
        return labelled({r: text for r, (_, text) in self._latest.items()})


def labelled(texts: dict[str, str]) -> bytes:
    """Merge Prometheus texts into one exposition, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families
