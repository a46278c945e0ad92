"""``headstart bench``: every mode side by side on one workload, in one run.

The model is loaded once; each mode gets a fresh engine on it and the same sessions,
requests and gaps, one mode after another, so the machine is the same for all and its
noise largely cancels in the ratios. Exact modes must reproduce the ``stateless``
outputs token for token; the run fails loudly when one does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from headstart.bench import modes as modes_mod
from headstart.bench.workloads import WORKLOADS, Workload, load_trace, make_workload, parse_gaps
from headstart.config import GATE_CONFIDENCE, GATE_TARGET, PREDICTOR
from headstart.idle.prepos import PREDICTORS
from headstart.server.flags import add_kernel_flags


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=WORKLOADS, default="agent", help="traffic to generate (default agent)")
    p.add_argument("--trace", default=None, help="replay a JSONL trace instead of generating a workload")
    p.add_argument("--quick", action="store_true", help="a small version of the workload: a smoke test")
    p.add_argument("--sessions", type=int, default=None, help="sessions in the workload")
    p.add_argument("--turns", type=int, default=None, help="requests per session")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length cap")
    p.add_argument("--clients", type=_counts, default=None,
                   help="sessions in flight at once (default 2); several, e.g. 1,2,4,8: a concurrency sweep of "
                        "the same requests at each count (throughput, TTFT, steps; bench/sweep.py)")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="the engine's step budget in tokens (default: the engine's, by device)")
    add_kernel_flags(p)  # every mode's engine and the sweep's (--model-only compares the kernels itself)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="run every mode on one group of sessions before the next group; default: groups of "
                        "--clients sessions, so a slow spell of a shared machine hits all modes alike")
    p.add_argument("--gaps", default=None,
                   help="idle gaps: long (default; 2-5 s and the session's idle work finished), short "
                        "(0.05-0.3 s, work in flight gets cancelled), fixed:S, uniform:A:B, exp:MEAN, "
                        "lognormal:MEDIAN:SIGMA; +settle / -settle to add or drop the wait for idle work")
    p.add_argument("--modes", default=",".join(modes_mod.BASE_MODES),
                   help="comma-separated; also prepositioned:PREDICTOR to compare predicted deltas "
                        f"({', '.join(PREDICTORS)})")
    p.add_argument("--gap-threshold", default=str(modes_mod.BENCH_GAP),
                   help="the gate mode's fixed logit-gap threshold; 'guaranteed': the server's default gate "
                        "(fires where the precision bound reaches --target, calibrated online); 'auto': "
                        "calibrated on this run's prepositioned mode with the same bound (in-sample)")
    p.add_argument("--target", type=float, default=GATE_TARGET, help="precision the calibration's bound aims for")
    p.add_argument("--confidence", type=float, default=GATE_CONFIDENCE, help="the confidence of that bound")
    p.add_argument("--predictor", choices=PREDICTORS, default=PREDICTOR, help="predicted next message")
    p.add_argument("--prefix-blocks", type=int, default=1024, help="prefix_cache capacity in blocks")
    p.add_argument("--prefix-block", type=int, default=16, help="prefix_cache block size in tokens")
    p.add_argument("--peer", choices=modes_mod.PEERS, default=None, help="also run a real peer over HTTP")
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter with llama-cpp-python[server] for the peer (default: this one); the "
                        "sweep (--clients 1,2,4,8) and --model-only run llama.cpp beside headstart when it has it")
    p.add_argument("--json", default=None, help="write the JSON report here")
    p.add_argument("--out", default=None, help="write PNG plots into this folder")
    p.add_argument("--records", default=None, help="write every request's record here (JSONL)")
    p.add_argument("--trace-out", default=None, help="write the workload as a JSONL trace here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and for the peer (default: torch's choice); 1 is steadier on a "
                        "machine shared with other jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--model-only", action="store_true",
                   help="no engine: the transformers backend and the own runner side by side (decode ms/token, "
                        "prefill tok/s, batched decode tok/s)")
    p.add_argument("--contexts", default="128,512,2048", help="--model-only: decode context lengths")
    p.add_argument("--batches", default="1,2,4,8", help="--model-only: sequences per batched decode forward")
    p.add_argument("--reps", type=int, default=5, help="--model-only: timed repetitions per figure (median)")
    p.add_argument("--no-engine", action="store_true",
                   help="--model-only: skip the engine figures (ready_exact TTFT, decode beside 1,000 idle sessions)")
    p.add_argument("--http", action="store_true",
                   help="instead: time to first token at an openai client over loopback HTTP, beside the server's "
                        "ttft_ms, on gate and ready_exact hits of one ~1,500-token session (bench/http.py)")


def _workload(args: argparse.Namespace, real_tools: bool = False) -> Workload:
    if args.trace:
        gaps = parse_gaps(args.gaps) if args.gaps else None
        return load_trace(args.trace, gaps)
    return make_workload(
        args.workload,
        seed=args.seed,
        quick=args.quick,
        sessions=args.sessions,
        turns=args.turns,
        max_tokens=args.max_tokens,
        gaps=args.gaps,
        real_tools=real_tools,
    )


def backend_threads() -> int:
    import torch

    return torch.get_num_threads()


def _record_json(r: Any) -> dict[str, Any]:
    d = asdict(r)
    d.pop("completion", None)
    return d


def _counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts are positive integers, e.g. 1,2,4,8")
    return counts


def run_bench(args: argparse.Namespace) -> int:
    if args.clients is not None and len(args.clients) > 1:
        from headstart.bench.sweep import run_sweep

        return run_sweep(args, args.clients)
    args.clients = args.clients[0] if args.clients else None
    if args.model_only:
        from headstart.bench.model_only import main

        return main(args)
    from tqdm import tqdm

    from headstart.bench.plots import write_plots
    from headstart.bench.report import build_report, failures, markdown
    from headstart.bench.runner import ModeRun, merge, run_mode, warm_up
    from headstart.model import load
    from headstart.model.loader import resolve
    from headstart.session.template import ChatTemplate

    if args.http:
        from headstart.bench.http import run_http

        return run_http(args)
    try:
        workload = _workload(args)
        auto = args.gap_threshold == "auto"
        threshold = (modes_mod.BENCH_GAP if auto else None if args.gap_threshold == "guaranteed"
                     else float(args.gap_threshold))
        if not (0.0 < args.target < 1.0 and 0.0 < args.confidence < 1.0):
            raise ValueError("--target and --confidence must be in (0, 1)")
        names = [m.strip() for m in args.modes.split(",") if m.strip()]
        specs = modes_mod.mode_specs(
            names,
            gap_threshold=threshold,
            target=args.target,
            confidence=args.confidence,
            predictor=args.predictor,
            prefix_blocks=args.prefix_blocks,
            prefix_block=args.prefix_block,
            attention=args.attention,
            linear=args.linear,
        )
    except (ValueError, OSError) as exc:
        print(f"headstart bench: {exc}", file=sys.stderr)
        return 2
    if auto and "gate" in names and "prepositioned" not in names[: names.index("gate")]:
        print("headstart bench: --gap-threshold auto needs the prepositioned mode before gate", file=sys.stderr)
        return 2
    clients = args.clients or (1 if len(workload.sessions) == 1 else 2)
    if args.trace_out:
        workload.to_jsonl(args.trace_out)
    notes: list[str] = []
    peer_reason = None
    if args.peer:
        from headstart.bench import peer_llamacpp

        peer_reason = peer_llamacpp.unavailable(args.peer_python)
        if peer_reason:
            msg = f"skipping the llamacpp peer: {peer_reason}. To run it: {peer_llamacpp.INSTALL_HINT}"
            print(f"headstart bench: {msg}", file=sys.stderr)
            notes.append(msg)

    if threads := args.threads:
        import torch

        torch.set_num_threads(threads)
    if threading.current_thread() is threading.main_thread():
        # A plain `kill` unwinds like Ctrl-C, so the peer's server process is stopped too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"loading the model... ({workload.requests} requests x {len(specs)} modes, {clients} clients)",
          file=sys.stderr)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    template = ChatTemplate(backend.tokenizer)  # type: ignore[attr-defined]
    if template.supports_tools and not args.trace and args.workload == "agent":
        # A tool-capable model gets the agent loop as agents send it: `tools` and real calls.
        workload = _workload(args, real_tools=True)
        notes.append("agent workload with real tools: `tools` in each request, tool calls and tool messages")
    warm_up(backend)
    legs = len(specs) + (1 if args.peer and not peer_reason else 0)
    bar = tqdm(total=workload.requests * legs, unit="req", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)

    def calibrated(spec: modes_mod.ModeSpec, runs: dict[str, ModeRun]) -> modes_mod.ModeSpec:
        """With ``--gap-threshold auto``, the gate at the threshold the prepositioned run
        calibrates to ``--target`` (in-sample; no threshold reaching it: the gate never fires)."""
        if not (auto and spec.name == "gate"):
            return spec
        from headstart.bench.report import calibration_figures, shadow_pairs

        pre = runs["prepositioned"]
        hits = sum(r.path == "ready_exact" for r in pre.records)
        cal = calibration_figures(shadow_pairs(pre), args.target, hits, len(pre.records), args.confidence)
        chosen = cal["threshold"] if cal["threshold"] is not None else float("inf")
        notes.append(
            f"gate threshold calibrated on this run's prepositioned mode (in-sample) to precision "
            f"{args.target:g}: {chosen:g}, resting on {cal['rests_on']} requests"
        )
        description = spec.description.replace(f"{modes_mod.BENCH_GAP:g}", f"{chosen:g}")
        return replace(spec, config=replace(spec.config, gap_threshold=chosen), description=description)

    # Calibrating in-run needs the whole prepositioned run before the gate: one round then.
    rounds = 1 if auto else (args.rounds or -(-len(workload.sessions) // clients))
    parts = workload.split(rounds)
    runs: dict[str, ModeRun] = {}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        peer = None
        if args.peer and not peer_reason:
            from headstart.bench import peer_llamacpp

            source = resolve(args.model, args.cache_dir)
            if any(script.tools for script in workload.sessions):
                notes.append("skipping the llamacpp peer: the workload sends tools, which the peer is not set up for")
            elif source.is_gguf:
                gguf = source.path / str(source.gguf_file)
                peer = stack.enter_context(
                    peer_llamacpp.LlamaCppServer(gguf, args.peer_python, threads=backend_threads())
                )
            else:
                notes.append("skipping the llamacpp peer: the model is not a GGUF file")
        for number, part in enumerate(parts, start=1):
            for spec in specs:
                tag = f"{spec.name} [{number}/{len(parts)}]" if len(parts) > 1 else spec.name
                bar.set_description(tag)
                run = run_mode(backend, calibrated(spec, runs), part, clients, bar.update)
                runs[spec.name] = merge(runs.get(spec.name), run)
                bar.write(f"{tag}: {len(run.records)} requests in {run.wall_s:.0f} s")
            if peer is not None:
                bar.set_description(f"{peer_llamacpp.NAME} [{number}/{len(parts)}]")
                run = peer_llamacpp.run_peer(peer, part, template, clients, bar.update)
                runs[run.name] = merge(runs.get(run.name), run)
                bar.write(f"{run.name} [{number}/{len(parts)}]: {len(run.records)} requests in {run.wall_s:.0f} s")
    elapsed = time.perf_counter() - started
    model = {"name": backend.info.name, "device": backend.info.device, "dtype": backend.info.dtype,
             "attention": args.attention, "linear": args.linear}
    command = "headstart " + " ".join(shlex.quote(a) for a in (args.argv or []))
    report = build_report(
        workload.describe(), model, runs, target=args.target, clients=clients, command=command, notes=notes,
        predictor=args.predictor, confidence=args.confidence,
    )
    report["elapsed_s"] = round(elapsed, 1)
    print(markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.json}", file=sys.stderr)
    if args.records:
        with open(args.records, "w") as f:
            for run in runs.values():
                for rec in run.records:
                    f.write(json.dumps(_record_json(rec)) + "\n")
    if args.out:
        for path in write_plots(runs, report, args.out):
            print(f"plot: {path}", file=sys.stderr)
    bad = failures(report)
    if bad:
        print("\n" + "!" * 72, file=sys.stderr)
        print("EXACTNESS FAILURE: exact modes gave outputs different from stateless:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        print("!" * 72, file=sys.stderr)
        return 1
    return 0
