"""``headstart bench --model-only``: the transformers backend and the own runner, side by side.

Both run in one process on the same weights (the runner shares the transformers model's
tensors), one measurement after the other at each size, so the machine's noise hits both
alike: decode ms/token at several context lengths, prefill tokens/s, and the aggregate
decode tokens/s of B sequences in one forward. llama.cpp on the same GGUF follows in a child
process of ``--peer-python`` (bench/peer_model.py), or the table says why it is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headstart.bench import peer_model
from headstart.kv import KVSeq
from headstart.model.hf import HFBackend
from headstart.model.llama import linear_usable
from headstart.model.runner import Feed, Runner, from_backend
from headstart.session.template import Message


def _interleaved_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms of each contender, run in turns (one of each, ``reps`` times): a slow spell
    of a shared machine hits every contender alike, so their ratios hold."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


PREFILL_TOKENS = 256  # the prompt of the prefill figure


def bench_ids(backend: HFBackend, contexts: list[int], reps: int) -> list[int]:
    """The token ids every contender decodes: enough for the longest context and its reps."""
    ids = (backend.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 400))
    need = max(contexts) + reps + 8
    return (ids * (need // len(ids) + 1))[:need]


def run_model_only(
    backend: HFBackend,
    contexts: list[int],
    batches: list[int],
    reps: int = 5,
    prefill_tokens: int = PREFILL_TOKENS,
    progress: bool = True,
    block_size: int = 16,
) -> dict[str, Any]:
    from tqdm import tqdm

    ids = bench_ids(backend, contexts, reps)
    budget = 2 * (max(contexts) + 64) * sum(batches) * backend.info.kv_bytes_per_token  # every batch held at once
    runners: dict[str, Runner] = {  # the default first, then the other modes (runner.py)
        "runner": from_backend(backend, kv_budget=budget, block_size=block_size),
        "runner mkl": from_backend(backend, kv_budget=budget, block_size=block_size, linear="mkl"),
        "runner tiled": from_backend(backend, kv_budget=budget, block_size=block_size, kernel="tiled"),
    }
    param = next(backend.model.parameters())
    if linear_usable("fp16", param.device, param.dtype):  # weight-only half precision, opt-in (llama.py)
        runners["runner fp16"] = from_backend(backend, kv_budget=budget, block_size=block_size, linear="fp16")
    batching = [name for name in runners if name != "runner tiled"]
    total = len(contexts) * (1 + len(runners)) + 1 + len(batches) * len(batching)
    bar = tqdm(total=total, disable=not progress, file=sys.stderr)
    decode: dict[str, dict[int, float]] = {"transformers": {}, **{k: {} for k in runners}}
    for ctx in contexts:
        state = backend.new_state()
        backend.forward(state, ids[:ctx])
        steps: dict[str, Callable[[], object]] = {"transformers": lambda s=state, t=ids[ctx]: backend.forward(s, [t])}
        held: list[KVSeq] = []
        for name, runner in runners.items():
            seq = KVSeq(runner.pool)
            for start in range(0, ctx, 256):
                runner.forward([Feed(seq, ids[start : min(ctx, start + 256)])])
            held.append(seq)
            steps[name] = lambda s=seq, r=runner, t=ids[ctx]: r.forward([Feed(s, [t])])
        bar.set_description(f"decode @{ctx}")
        for name, ms in _interleaved_ms(steps, reps).items():
            decode[name][ctx] = ms
        for seq in held:
            seq.release()
        bar.update(1 + len(runners))
    prompt = ids[:prefill_tokens]

    def own_prefill(runner: Runner) -> None:
        seq = KVSeq(runner.pool)
        runner.forward([Feed(seq, prompt)])
        seq.release()

    bar.set_description("prefill")
    prefill = _interleaved_ms({"transformers": lambda: backend.forward(backend.new_state(), prompt),
                               **{name: lambda r=runner: own_prefill(r) for name, runner in runners.items()}}, 2)
    bar.update()
    # Every batch size of every contender takes its turn in each rep: a ratio to one sequence
    # holds like a ratio between contenders, however the machine's speed drifts.
    ctx = min(contexts)
    steps, held, of = {}, [], {}
    for b in batches:
        for name in batching:
            runner = runners[name]
            seqs = [KVSeq(runner.pool) for _ in range(b)]
            runner.forward([Feed(s, ids[i : i + ctx]) for i, s in enumerate(seqs)])
            held += seqs
            steps[f"{name} x{b}"] = lambda ss=seqs, r=runner: r.forward([Feed(s, [ids[ctx]]) for s in ss])
            of[f"{name} x{b}"] = name, b
    bar.set_description("batched decode")
    batched: dict[str, dict[int, float]] = {}
    for key, ms in _interleaved_ms(steps, reps).items():
        name, b = of[key]
        batched.setdefault(name, {})[b] = b * 1000 / ms
    for seq in held:
        seq.release()
    bar.update(len(batches) * len(batching))
    bar.close()
    return {
        "model": backend.info.name,
        "decode_ms": decode,
        "prefill_tok_s": {k: prefill_tokens * 1000 / ms for k, ms in prefill.items()},
        "batched_decode_tok_s": batched,
        "batched_context": ctx,
        "llama_cpp": "not run (headstart bench --model-only runs it, bench/peer_model.py)",
    }


def _decode_ms(engine: Any, sid: str, messages: list[dict[str, str]], tokens: int) -> float:
    """ms per decoded token of one greedy answer (its first token excluded)."""
    from headstart.decode.sampling import SamplingParams
    from headstart.engine.engine import Request

    c = engine.generate(Request(messages=messages, params=SamplingParams(max_tokens=tokens), session_id=sid))
    return (c.e2e_ms - c.ttft_ms) / max(1, len(c.token_ids) - 1)


def warmed_turns(engine: Any, context: int, rounds: int = 3, tokens: int = 1) -> list[tuple[list[Message], Any]]:
    """The engine figures' setup, ``rounds`` times over one ``context``-token session: the
    client names its next message (the session's hint), waits for the idle-time work, and
    sends it (a ``ready_exact`` hit), then streams another message, a new one each round
    (the gate answers it from the position's cached distribution: only a streaming client
    gets a gate answer; the session's render cache has not seen it, as in real use).
    Both are ephemeral, so every round finds the session as the first turn left it.
    Returns each turn's messages and completion, in order."""
    from headstart.decode.sampling import SamplingParams
    from headstart.engine.engine import Request

    words = "The committee met on Tuesday to review the budget, the roadmap and the hiring plan. "
    long: list[Message] = [{"role": "user", "content": words * max(1, context // 18)}]
    params = SamplingParams(max_tokens=tokens)
    first = engine.generate(Request(messages=long, params=params, session_id="long"))
    s = engine.get_session("long")
    said = [*long, {"role": "assistant", "content": first.text}]
    follow = [*said, {"role": "user", "content": "Thanks."}]  # what the hint predicts: ready_exact
    turns: list[tuple[list[Message], Any]] = []
    for i in range(rounds):
        other = [*said, {"role": "user", "content": f"Thank you ({i + 1})."}]  # not predicted: the gate answers
        s.settings.hint = "Thanks."
        engine.schedule_pre_position(s)
        engine.wait_idle(600)
        turns.append((follow, engine.generate(Request(messages=follow, params=params, session_id="long",
                                                      ephemeral=True))))
        engine.wait_idle(600)  # the upkeep the ask queued: the gate's turn finds the loop idle too
        turns.append((other, engine.generate(Request(messages=other, params=params, session_id="long",
                                                     ephemeral=True, stream=True, gap_threshold=0.0))))
    s.settings.hint = None
    return turns


def engine_figures(backend: HFBackend, context: int = 1000, idle: int = 1000, rounds: int = 7) -> dict[str, Any]:
    """In the engine: ready_exact and gate TTFT at a ``context``-token session (medians of
    ``rounds`` rounds after one that warms up: a process's first hit runs code for the first
    time), and one session's decode ms/token with ``idle`` other sessions resident against
    with none."""
    from headstart.engine.engine import Engine, EngineConfig

    config = EngineConfig(gate=True, gap_threshold=float("inf"), max_sessions=idle + 8)  # + long, active*
    engine = Engine(backend, config=config).start()
    try:
        turns = warmed_turns(engine, context, rounds=rounds + 1)
        ttft: dict[str, list[float]] = {}
        for _, c in turns[2:]:
            ttft.setdefault(c.path, []).append(c.ttft_ms)
        prompt = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
        alone = _decode_ms(engine, "active", prompt, 32)
        engine.wait_idle(600)
        base = KVSeq(engine.pool)
        engine.runner.forward([Feed(base, list(range(100, 164)))])
        for i in range(idle):  # idle sessions holding KV (forks of one sequence: no copies)
            resident = engine.create_session(f"idle-{i}")
            resident.kv.adopt(base.fork())
            resident.kv_background = bytearray(len(resident.kv_ids))
        crowded = _decode_ms(engine, "active2", prompt, 32)
        base.release()
    finally:
        engine.stop()
    return {
        "context_tokens": turns[0][1].prompt_tokens,
        "ttft_ms": {k: statistics.median(v) for k, v in ttft.items()},
        "rounds": rounds,
        "decode_ms_alone": alone,
        "decode_ms_with_idle": crowded,
        "idle_sessions": idle,
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
    hfp = r["prefill_tok_s"]["transformers"]
    lines += ["", "prefill tok/s: " + ", ".join(
        f"{k} {v:.0f}" + ("" if k == "transformers" else f" ({v / hfp:.2f}x)") for k, v in r["prefill_tok_s"].items()),
        "", f"| sequences in one decode forward (ctx {r['batched_context']}) | "
        + " | ".join(f"{k} tok/s (vs 1)" for k in r["batched_decode_tok_s"]) + " |",
        "| --- |" + " --- |" * len(r["batched_decode_tok_s"])]
    rows = r["batched_decode_tok_s"]
    for b in next(iter(rows.values())):
        cells = [f"{row[b]:.1f} ({row[b] / row[min(row)]:.2f}x)" for row in rows.values()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    e = r.get("engine")
    if e:
        lines += ["", f"engine, a {e['context_tokens']}-token session, medians of {e['rounds']} rounds: "
                  + ", ".join(f"{k} TTFT {v:.2f} ms" for k, v in e["ttft_ms"].items()),
                  f"engine decode ms/token: alone {e['decode_ms_alone']:.1f}, with {e['idle_sessions']} idle "
                  f"sessions resident {e['decode_ms_with_idle']:.1f} "
                  f"({e['decode_ms_with_idle'] / e['decode_ms_alone']:.2f}x)"]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path:
    """Decode ms/token against context per forward, and batched decode throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for name, row in r["decode_ms"].items():
        a.plot(list(row), list(row.values()), marker="o", label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("context (tokens)")
    a.set_ylabel("decode ms/token")
    a.legend()
    for name, batched in r["batched_decode_tok_s"].items():
        b.plot(list(batched), list(batched.values()), marker="o", label=name)
    b.legend()
    b.set_xlabel("sequences in one forward")
    b.set_ylabel("aggregate decode tokens/s")
    fig.suptitle(f"{r['model']}: " + ", ".join(r["decode_ms"]))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    import json

    from headstart.model import load

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    r = run_model_only(backend, contexts, batches, reps=args.reps, progress=not args.no_progress)
    peer_model.run(args, r, bench_ids(backend, contexts, args.reps), contexts, batches, PREFILL_TOKENS)
    if not args.no_engine:
        r["engine"] = engine_figures(backend)
    print(format_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(f"plot: {plot(r, Path(args.out) / 'model-only.png')}")
    return 0
