"""``GET /metrics``: the engine in the Prometheus text format.

Each app owns a registry (never the process-global one, so tests can run several apps).
Per-request figures (time to first token by path, end-to-end time, tokens) are observed as
each request finishes, through the engine's completion observers; the foreground wait
behind background work through the scheduler's wait observers. Everything else (gate,
background tokens, sessions, KV bytes, streaming data) is read from the engine at scrape
time by a collector, so it can never drift from what the engine reports elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from headstart.engine.engine import Engine
from headstart.engine.output import Completion

log = logging.getLogger("headstart.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector(Collector):
    """Engine counters and gauges, read when scraped."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        up = GaugeMetricFamily("headstart_model_loaded", "1 once the model is loaded")
        up.add_metric([], 1.0 if engine is not None else 0.0)
        yield up
        if engine is None:
            return
        try:
            yield from self._engine(engine)
        except Exception:  # a scrape must never fail the endpoint
            log.exception("metrics collection failed")

    def _gate(self, engine: Engine) -> Iterator[Metric]:
        """Per calibration key: where the gate fires (NaN: closed), the precision above it with
        its lower bound, the coverage and the verified answers it rests on; and the reason of
        each closed key as an info-style gauge."""
        desc = engine.gate.describe()
        fixed = desc["fixed_threshold"]
        mode = GaugeMetricFamily("headstart_gate_guaranteed", "1: the gate fires only where its precision bound holds")
        mode.add_metric([], 0.0 if fixed is not None else 1.0)
        yield mode
        target = GaugeMetricFamily("headstart_gate_target", "the precision the gate's lower bound must reach")
        target.add_metric([], desc["target"])
        yield target
        if fixed is not None:
            gate = GaugeMetricFamily("headstart_gate_fixed_threshold", "the server's fixed gate threshold (logit gap)")
            gate.add_metric([], fixed)
            yield gate
        families = {
            name: GaugeMetricFamily(f"headstart_gate_{name}", doc, labels=["key"])
            for name, doc in (
                ("threshold", "the calibrated logit-gap threshold per key (NaN: closed)"),
                ("precision", "precision of the verified answers at or above the threshold (NaN: none)"),
                ("precision_bound", "lower confidence bound of that precision (NaN: not tested)"),
                ("coverage", "share of the key's verified answers at or above the threshold"),
                ("evidence", "verified answers (gate answers and shadow checks) the key's calibration rests on"),
            )
        }
        closed = GaugeMetricFamily(
            "headstart_gate_closed", "1 per closed key, with the reason", labels=["key", "reason"]
        )
        nan = float("nan")
        for key, k in desc["keys"].items():
            for name, value in (("threshold", k["threshold"]), ("precision", k["precision"]),
                                ("precision_bound", k["bound"]), ("coverage", k["coverage"]), ("evidence", k["n"])):
                families[name].add_metric([key], nan if value is None else float(value))
            if not k["open"]:
                closed.add_metric([key, k["reason"] or ""], 1.0)
        yield from families.values()
        yield closed

    def _engine(self, engine: Engine) -> Iterator[Metric]:
        g = engine.gate.counters
        for name, value, doc in (
            ("fires", g.fires, "requests answered by the gate from a cached distribution"),
            ("verified", g.verified, "gate answers whose first token a full computation confirmed"),
            ("false_accepts", g.false_accepts, "gate answers a full computation contradicted"),
            ("declined", g.declined, "requests with a ready position where the gate did not fire"),
        ):
            c = CounterMetricFamily(f"headstart_gate_{name}", doc)
            c.add_metric([], value)
            yield c
        yield from self._gate(engine)

        stats = engine.stats.snapshot()
        bg = CounterMetricFamily(
            "headstart_background_tokens", "tokens computed by idle-time work, and what became of them", labels=["kind"]
        )
        for kind, value in stats["background_tokens"].items():
            bg.add_metric([kind], value)
        yield bg
        # The engine's own count, the one the report and /health read: not counted again here.
        requests = CounterMetricFamily("headstart_requests", "finished requests, by path", labels=["path"])
        for path, n in stats["paths"].items():
            if n:
                requests.add_metric([path], n)
        yield requests
        for name, doc in (("forward_calls", "model forward passes"), ("errors", "requests or jobs that failed")):
            c = CounterMetricFamily(f"headstart_{name}", doc)
            c.add_metric([], stats[name])
            yield c

        steps = stats["steps"]
        for name, value, doc in (
            ("steps", steps["n"], "steps of the model loop (one forward each)"),
            ("step_tokens", steps["tokens_total"], "tokens the steps' forwards computed"),
            ("step_background_tokens", steps["background_tokens_total"],
             "of those, tokens of idle-time work (riding in the budget requests left)"),
        ):
            c = CounterMetricFamily(f"headstart_{name}", doc)
            c.add_metric([], value)
            yield c
        budget = GaugeMetricFamily("headstart_step_budget_tokens", "tokens one step may hold (--step-tokens)")
        budget.add_metric([], engine.scheduler.step_tokens)
        yield budget
        for name, key, scale, doc in (
            ("step_duration_seconds", "duration_ms", 1e-3, "duration of recent steps"),
            ("step_tokens_per_step", "tokens", 1, "tokens per recent step"),
            ("step_sequences", "sequences", 1, "sequences per recent step's forward"),
            ("step_background_share", "background_budget_share", 1, "share of the step budget idle work used"),
        ):
            g = GaugeMetricFamily(f"headstart_{name}", doc, labels=["quantile"])
            for q, label in (("p50", "0.5"), ("p99", "0.99")):
                value = steps[key][q]
                g.add_metric([label], float("nan") if value is None else value * scale)
            yield g

        sessions = engine.sessions.all()  # all owners
        resident = GaugeMetricFamily("headstart_sessions", "sessions resident")
        resident.add_metric([], len(sessions))
        yield resident
        busy = GaugeMetricFamily("headstart_sessions_busy", "sessions with a request in flight")
        busy.add_metric([], sum(1 for s in sessions if s.busy))
        yield busy
        memory = engine.report()["kv"]
        kv = GaugeMetricFamily("headstart_kv_bytes", "bytes of KV resident: session caches and ready positions")
        kv.add_metric([], memory["resident_bytes"])
        yield kv
        for name, key, doc in (
            ("kv_budget_bytes", "budget_bytes", "the KV budget (--kv-budget)"),
            ("kv_peak_bytes", "peak_bytes", "the most KV ever resident at once"),
            ("sessions_with_kv", "resident_sessions", "sessions whose KV is resident"),
        ):
            g = GaugeMetricFamily(f"headstart_{name}", doc)
            g.add_metric([], memory[key])
            yield g
        evictions = CounterMetricFamily("headstart_evictions", "KV evictions and their fate", labels=["kind"])
        for kind in ("evicted_ready", "evicted_kv", "spilled", "reloaded", "expired"):
            evictions.add_metric([kind.removeprefix("evicted_")], memory[kind])
        yield evictions
        kv_tokens = GaugeMetricFamily("headstart_kv_tokens", "tokens of KV resident in session caches")
        kv_tokens.add_metric([], sum(len(s.kv) for s in sessions))
        yield kv_tokens

        stream = engine.stream_stats.snapshot()
        data = CounterMetricFamily("headstart_data_entries", "streamed data entries", labels=["event"])
        for event in ("pushed", "ingested", "dropped"):
            data.add_metric([event], stream[event])
        yield data
        q = CounterMetricFamily("headstart_query_evaluations", "registered questions answered in the background")
        q.add_metric([], stream["query_evaluations"])
        yield q
        warm = CounterMetricFamily("headstart_warms", "warm requests by outcome", labels=["status"])
        for status, key in (("warmed", "warmed"), ("covered", "warm_covered"), ("cancelled", "warm_cancelled")):
            warm.add_metric([status], stream[key])
        yield warm
        warmed = CounterMetricFamily("headstart_warmed_tokens", "prompt tokens prefilled by warm requests")
        warmed.add_metric([], stream["warmed_tokens"])
        yield warmed


class Metrics:
    """The registry of one app and the observers that feed it."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        """``engine`` gives the app's engine, or None while it loads."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "headstart_ttft_seconds", "time to first token, by path", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "headstart_e2e_seconds", "time to the whole answer, by path", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("headstart_tokens", "tokens of finished requests", ["kind"], registry=r)
        self.speculative = Counter("headstart_speculative_answers", "answers given from a cached distribution",
                                   registry=r)
        self.queue_wait = Histogram(
            "headstart_queue_wait_seconds", "time from a request's arrival to the model's first step on it",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        # The two parts of that wait: the door's work (parsing, rendering, tokenising, tool
        # planning) and the queue for the step loop.
        self.door = Histogram(
            "headstart_door_seconds", "time from arrival to queued: parsing, checks, rendering, tokenising",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "headstart_queue_seconds", "time from queued to the model's first step on the request",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.background_wait = Histogram(
            "headstart_foreground_wait_on_background_seconds",
            "time a request's computation waited in steps that ran idle-time work (0 by the step order)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        r.register(EngineCollector(engine))

    def attach(self, engine: Engine) -> None:
        engine.observers.append(self.observe)
        engine.scheduler.wait_observers.append(self.background_wait.observe)

    def observe(self, c: Completion) -> None:
        """Called by the step loop as each request finishes."""
        self.ttft.labels(c.path).observe(c.ttft_ms / 1000)
        self.e2e.labels(c.path).observe(c.e2e_ms / 1000)
        self.tokens.labels("prompt").inc(c.prompt_tokens)
        self.tokens.labels("cached").inc(c.cached_tokens)
        self.tokens.labels("completion").inc(c.completion_tokens)
        self.queue_wait.observe(c.foreground_wait_ms / 1000)
        self.door.observe(c.door_ms / 1000)
        self.queue.observe(c.queue_ms / 1000)
        if c.speculative:
            self.speculative.inc()


async def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
