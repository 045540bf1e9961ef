"""The server's metrics, written in Prometheus' text exposition format (version 0.0.4).

Counters and histograms are kept per app (no process-wide registry), so two apps in one
process, or an app in a test, never see each other's numbers.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence

__all__ = ["Histogram", "Metrics"]

# seconds; first-token latency spans a queue wait, per-token latency a decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(10), "").replace(chr(34), "")}"'
        for k, v in labels.items())
    return "{" + body + "}"


class Histogram:
    """Cumulative buckets, sum and count, like a Prometheus client's histogram."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    """What /metrics reports: the server's own counters and latency histograms, and
    the engine's gauges (queue, running requests, KV cells) read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.ttft = Histogram("llamabind_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.",
                              TTFT_BUCKETS)
        self.per_token = Histogram("llamabind_time_per_output_token_seconds",
                                   "Time between generated tokens of a request.",
                                   TOKEN_BUCKETS)
        self.duration = Histogram("llamabind_request_duration_seconds",
                                  "Time from a generation request's arrival to its last token.",
                                  DURATION_BUCKETS)

    def count_request(self, endpoint: str, code: int) -> None:
        with self._lock:
            key = (endpoint, str(code))
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_tokens(self, seconds_each: float, n: int) -> None:
        with self._lock:
            self.per_token.observe(seconds_each, n)

    def observe_duration(self, seconds: float) -> None:
        with self._lock:
            self.duration.observe(seconds)

    def render(self, engine_stats: Mapping[str, int], in_flight: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str,
                   samples: Sequence[tuple[Mapping[str, str], float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")

        with self._lock:
            metric("llamabind_requests_total", "counter",
                   "HTTP requests answered, by endpoint and status code.",
                   [({"endpoint": e, "code": c}, n) for (e, c), n in sorted(self.requests.items())])
            metric("llamabind_prompt_tokens_total", "counter",
                   "Prompt tokens of the generation requests served.",
                   [({}, self.prompt_tokens)])
            metric("llamabind_completion_tokens_total", "counter",
                   "Tokens generated for the requests served.",
                   [({}, self.completion_tokens)])
            metric("llamabind_requests_cancelled_total", "counter",
                   "Generations stopped early: the client went away or the server stopped.",
                   [({}, self.cancelled)])
            hist = [self.ttft.render(), self.per_token.render(), self.duration.render()]
        metric("llamabind_requests_in_flight", "gauge",
               "Generation requests the server is answering now.", [({}, in_flight)])
        gauges = (
            ("requests_queued", "Requests waiting in the engine's queue for a slot."),
            ("requests_running", "Requests the engine is decoding now."),
            ("kv_cells_used", "KV cache cells in use."),
            ("kv_cells_total", "KV cache cells in all."),
            ("n_parallel", "Sequences the engine decodes together (slots)."),
            ("max_queue", "The engine's queue limit; beyond it requests get 429."),
        )
        for key, help_text in gauges:
            if key in engine_stats:
                metric(f"llamabind_{key}", "gauge", help_text, [({}, engine_stats[key])])
        for h in hist:
            lines.extend(h)
        return "\n".join(lines) + "\n"
