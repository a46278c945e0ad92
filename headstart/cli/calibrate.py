"""``headstart calibrate``: where the guaranteed gate would fire on a workload, and what it leaves.

A workload (generated, or replayed from a JSONL trace) runs with pre-positioning on and
the gate *silent*: every request whose session had a ready position and whose prompt
differed from it records what the gate would have answered (the logit gap at the ready
position and whether its choice equals the real computation's first token). That is the
same (gap, verified) pair a gate at threshold 0 would record by answering, without
letting a false accept change the answer and everything after it. From the pairs, with the
same math the server's gate uses online (:func:`headstart.engine.gate.calibrate`), comes the lowest
threshold whose answers' lower precision bound reaches the target, the coverage it leaves,
how many requests it rests on, and the whole precision-coverage curve with its bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from headstart.bench.modes import ModeSpec
from headstart.bench.workloads import load_trace, make_workload, parse_gaps

# No sleeping, but every request waits until its session's idle-time work is done: each
# request then meets a finished ready position, which is what calibration is about.
CALIBRATION_GAPS = "fixed:0+settle"


def run_calibrate(args: argparse.Namespace) -> int:
    from headstart.bench.report import calibration_figures, repeats, shadow_pairs
    from headstart.bench.runner import run_mode, warm_up
    from headstart.model import load
    from headstart.server.flags import engine_config

    try:
        gaps = parse_gaps(getattr(args, "gaps", None) or CALIBRATION_GAPS)
        if args.trace:
            workload = load_trace(args.trace, gaps)
        else:
            workload = make_workload(
                getattr(args, "workload", "agent"),
                seed=args.seed,
                sessions=args.sessions,
                turns=args.turns,
                max_tokens=args.max_tokens,
                gaps=gaps,
            )
    except (ValueError, OSError) as exc:
        print(f"headstart calibrate: {exc}", file=sys.stderr)
        return 2
    target, confidence = args.gate_target, args.gate_confidence
    if not (0.0 < target < 1.0 and 0.0 < confidence < 1.0):
        print("headstart calibrate: --gate-target and --gate-confidence must be in (0, 1)", file=sys.stderr)
        return 2
    config = replace(engine_config(args), pre_position=True, gate=False)
    spec = ModeSpec("calibrate", "pre-positioning on, gate silent", config, sessions=True, exact=True, query=True)
    print(f"loading the model... ({workload.requests} requests)", file=sys.stderr)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    warm_up(backend)
    run = run_mode(backend, spec, workload, getattr(args, "clients", None) or 2)
    hits = sum(r.path == "ready_exact" for r in run.records)
    n = len(run.records)
    cal = calibration_figures(shadow_pairs(run), target, hits, n, confidence)
    fresh = calibration_figures(shadow_pairs(run, repeats(run.records)), target, hits, n, confidence)
    result = {
        "workload": workload.describe(),
        "model": backend.info.name,
        "requests": n,
        "ready_exact": hits,
        **cal,
        "without_repeats": {k: v for k, v in fresh.items() if k != "curve"},
    }
    print(f"{workload.name}: {n} requests, {hits} answered exactly from a ready position, "
          f"{cal['rests_on']} had a ready position and a different prompt (the calibration rests on these).")
    if cal["threshold"] is None:
        print(f"The gate stays closed for this model and traffic: {cal['reason']} (only exact ready "
              "positions answer).")
    else:
        print(f"Threshold where the lower bound of precision reaches {target:g} at confidence {confidence:g}: "
              f"logit gap {cal['threshold']:.3f} -> precision {cal['precision']:.3f} (bound {cal['bound']:.3f}) "
              f"on {cal['fired']} answers, coverage {cal['coverage']:.1%} of requests (ready_exact + gate).")
    print("\n threshold  fires  precision  bound  coverage")
    for p in cal["curve"]:
        prec = "-" if p["precision"] is None else f"{p['precision']:.3f}"
        bound = "-" if p["bound"] is None else f"{p['bound']:.3f}"
        print(f" {p['threshold']:9.3f}  {p['fired']:5d}  {prec:>9}  {bound:>5}  {p['coverage']:8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten: {args.json}", file=sys.stderr)
    return 0
