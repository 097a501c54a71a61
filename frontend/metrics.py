"""The frontend's Prometheus metrics, served at /metrics on the WebSocket port.

One registry per server (not prometheus_client's global one), so that several servers in one
process (the tests, the baseline) keep their counts apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

PREFIX = "twopass_frontend"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Partials are due within a first-pass chunk (600 ms by default); second-pass results within
# a few seconds of the segment's end.
PARTIAL_LAG_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
SECOND_PASS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0, 30.0)


class FrontendMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)  # RSS, CPU seconds, open files of this process
        self.connections_open = Gauge(f"{PREFIX}_connections_open", "WebSocket connections open", registry=registry)
        self.streams_open = Gauge(f"{PREFIX}_streams_open", "Streams started and not yet ended", registry=registry)
        self.streams = Counter(f"{PREFIX}_streams", "Streams started, by mode", ["mode"], registry=registry)
        self.messages = Counter(f"{PREFIX}_messages", "Messages sent to clients, by their mode field",
                                ["mode"], registry=registry)
        self.errors = Counter(f"{PREFIX}_errors", "Error messages sent to clients, by code", ["code"],
                              registry=registry)
        self.partial_lag = Histogram(
            f"{PREFIX}_partial_lag_seconds",
            "From the arrival of the audio that completed a first-pass chunk to its partial going out",
            buckets=PARTIAL_LAG_BUCKETS, registry=registry)
        self.second_pass_latency = Histogram(
            f"{PREFIX}_second_pass_seconds",
            "From the VAD's report of a segment's end to its second-pass text going out",
            buckets=SECOND_PASS_BUCKETS, registry=registry)
        self.failovers = Counter(f"{PREFIX}_failovers", "Streams moved to another inference server after theirs "
                                 "was lost", registry=registry)
        self.backend_ready = Gauge(f"{PREFIX}_backend_ready", "1 while the backend answers ready, else 0",
                                   ["backend"], registry=registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
