"""``headstart bench --model-only``: the transformers backend and the own runner, side by side.

Both run in one process on the same weights (the runner shares the transformers model's
tensors), one measurement after the other at each size, so the machine's noise hits both
alike: decode ms/token at several context lengths, prefill tokens/s, and the aggregate
decode tokens/s of B sequences in one forward. llama.cpp is reported when installed.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from headstart.kv import KVSeq
from headstart.model.hf import HFBackend
from headstart.model.runner import Feed, Runner, from_backend


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
    sys.stderr.flush()


def run_model_only(
    backend: HFBackend,
    contexts: list[int],
    batches: list[int],
    reps: int = 5,
    prefill_tokens: int = 256,
) -> dict[str, Any]:
    ids = (backend.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 400))
    need = max(contexts) + reps + 8
    ids = (ids * (need // len(ids) + 1))[:need]
    budget = 2 * (max(contexts) + 64) * max(batches) * backend.info.kv_bytes_per_token
    runners: dict[str, Runner] = {
        "runner": from_backend(backend, kv_budget=budget),
        "runner_min1": from_backend(backend, kv_budget=budget, min_rows=1),
    }
    steps = len(contexts) * (1 + len(runners)) + 1 + len(batches)
    done = 0
    decode: dict[str, dict[int, float]] = {"transformers": {}, **{k: {} for k in runners}}
    for ctx in contexts:
        state = backend.new_state()
        backend.forward(state, ids[:ctx])
        decode["transformers"][ctx] = _median_ms(lambda s=state, t=ids[ctx]: backend.forward(s, [t]), reps)
        done += 1
        _progress(done, steps, f"decode transformers @{ctx}")
        for name, runner in runners.items():
            seq = KVSeq(runner.pool)
            for start in range(0, ctx, 256):
                runner.forward([Feed(seq, ids[start : min(ctx, start + 256)])])
            decode[name][ctx] = _median_ms(lambda s=seq, r=runner, t=ids[ctx]: r.forward([Feed(s, [t])]), reps)
            seq.release()
            done += 1
            _progress(done, steps, f"decode {name} @{ctx}")
    prompt = ids[:prefill_tokens]
    hf_prefill = _median_ms(lambda: backend.forward(backend.new_state(), prompt), 2)
    runner = runners["runner"]

    def own_prefill() -> None:
        seq = KVSeq(runner.pool)
        runner.forward([Feed(seq, prompt)])
        seq.release()

    own = _median_ms(own_prefill, 2)
    done += 1
    _progress(done, steps, "prefill")
    batched: dict[int, float] = {}
    ctx = min(contexts)
    for b in batches:
        seqs = [KVSeq(runner.pool) for _ in range(b)]
        runner.forward([Feed(s, ids[i : i + ctx]) for i, s in enumerate(seqs)])
        ms = _median_ms(lambda ss=seqs: runner.forward([Feed(s, [ids[ctx]]) for s in ss]), reps)
        batched[b] = b * 1000 / ms
        for s in seqs:
            s.release()
        done += 1
        _progress(done, steps, f"batched decode x{b}")
    sys.stderr.write("\n")
    return {
        "model": backend.info.name,
        "decode_ms": decode,
        "prefill_tok_s": {"transformers": prefill_tokens * 1000 / hf_prefill, "runner": prefill_tokens * 1000 / own},
        "batched_decode_tok_s": batched,
        "batched_context": ctx,
        "llama_cpp": "installed" if importlib.util.find_spec("llama_cpp") else "not installed",
    }


def format_table(r: dict[str, Any]) -> str:
    ctxs = list(r["decode_ms"]["transformers"])
    lines = [f"model {r['model']}; llama.cpp: {r['llama_cpp']}", "",
             "| decode ms/token | " + " | ".join(f"ctx {c}" for c in ctxs) + " |",
             "| --- |" + " --- |" * len(ctxs)]
    hf = r["decode_ms"]["transformers"]
    for name, row in r["decode_ms"].items():
        cells = [f"{row[c]:.1f}" + ("" if name == "transformers" else f" ({row[c] / hf[c]:.2f}x)") for c in ctxs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = r["prefill_tok_s"]
    lines += ["", f"prefill tok/s: transformers {p['transformers']:.0f}, runner {p['runner']:.0f}", "",
              f"| sequences in one decode forward (ctx {r['batched_context']}) | tok/s | vs 1 |", "| --- | --- | --- |"]
    one = r["batched_decode_tok_s"][min(r["batched_decode_tok_s"])]
    for b, tps in r["batched_decode_tok_s"].items():
        lines.append(f"| {b} | {tps:.1f} | {tps / one:.2f}x |")
    return "\n".join(lines)
