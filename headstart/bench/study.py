"""The gate study: several models side by side on the same workloads, from their bench records.

Each input is the ``--records`` JSONL of one ``headstart bench --modes
[stateless,]prepositioned,gate`` run (without stateless, the prepositioned run's exact answers
are the reference). From the records alone (so every run is read with the
same code, whatever version wrote its report) it derives, per model and workload: where the
guaranteed gate would fire (:func:`headstart.engine.gate.calibrate` on the prepositioned run's
shadow checks, all of them and with repeated answers left out), how often the gate's choice
agrees with the full computation on all and on non-repeated decisions, the fixed-threshold
gate's fires and false accepts, answers right by the workload's rule, and TTFT p50 by path.

``python -m headstart.bench.study MODEL=RECORDS.jsonl ... --markdown OUT.md --png OUT.png``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from headstart.bench.report import repeats, shadow_pairs
from headstart.bench.runner import ModeRun, Record
from headstart.config import GATE_CONFIDENCE, GATE_TARGET
from headstart.engine.gate import calibrate, lower_bound
from headstart.stats import percentile


def load_runs(path: str | Path) -> dict[str, ModeRun]:
    """The records of one bench run, as one run per mode."""
    by_mode: dict[str, list[Record]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = Record(**json.loads(line))
            by_mode[r.mode].append(r)
    return {m: ModeRun(m, m, m != "gate", recs, 0.0, {}, {}, []) for m, recs in by_mode.items()}


def common(runs_by_model: dict[str, dict[str, ModeRun]]) -> dict[str, dict[str, ModeRun]]:
    """Every model's runs cut to the requests (session, step) that all of them ran: a larger
    model may run a reduced set of the same workload (the same seed gives the same sessions)."""
    keys = set.intersection(*({r.key for run in runs.values() for r in run.records}
                              for runs in runs_by_model.values()))
    return {
        model: {name: replace(run, records=[r for r in run.records if r.key in keys]) for name, run in runs.items()}
        for model, runs in runs_by_model.items()
    }


def _share(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def figures(runs: dict[str, ModeRun], target: float = GATE_TARGET,
            confidence: float = GATE_CONFIDENCE) -> dict[str, Any]:
    """The study's row for one model on one workload."""
    pre, gate = runs["prepositioned"], runs["gate"]
    ref = runs.get("stateless") or pre  # the prepositioned run is exact too: its answers are the real ones
    rep = repeats(ref.records)
    pairs, fresh = shadow_pairs(pre), shadow_pairs(pre, rep)
    cal, cal_fresh = calibrate(pairs, target, confidence), calibrate(fresh, target, confidence)
    n = len(pre.records)
    exact = sum(r.path == "ready_exact" for r in pre.records)
    fired = [r for r in gate.records if r.path == "gate" and r.verified is not None]
    fired_fresh = [r for r in fired if not rep.get(r.key, False)]
    judged = [r for r in ref.records if r.truth is not None]
    gate_judged = [r for r in gate.records if r.path == "gate" and r.truth is not None]
    by_path: dict[str, float | None] = {}
    for run in (ref, pre, gate):
        for p in sorted({r.path for r in run.records}):
            key = "stateless" if run.name == "stateless" else p
            if key not in by_path:
                by_path[key] = percentile([r.ttft_ms for r in run.records if r.path == p], 50)
    return {
        "requests": n,
        "ready_exact": exact,
        "decisions": len(pairs),
        "decisions_without_repeats": len(fresh),
        "agreement": _share(sum(ok for _, ok in pairs), len(pairs)),
        "agreement_without_repeats": _share(sum(ok for _, ok in fresh), len(fresh)),
        # how high the agreement of all (non-repeated) decisions is known to be, at the confidence
        "agreement_bound": _bound(pairs, confidence),
        "agreement_without_repeats_bound": _bound(fresh, confidence),
        "repeat_share": _share(sum(rep.values()), len(rep)),
        "guaranteed": {"threshold": cal.threshold, "coverage": _share(exact + cal.fired, n),
                       "precision": cal.precision, "bound": cal.bound, "reason": cal.reason},
        "guaranteed_without_repeats": {"threshold": cal_fresh.threshold, "reason": cal_fresh.reason},
        "fixed_gate": {"fires": len(fired),
                       "false_accepts": sum(not r.verified for r in fired),
                       "precision": _share(sum(bool(r.verified) for r in fired), len(fired)),
                       "fires_without_repeats": len(fired_fresh),
                       "precision_without_repeats": _share(sum(bool(r.verified) for r in fired_fresh),
                                                           len(fired_fresh))},
        "right_by_rule": None if not judged else {
            "real": _share(sum(r.answer == r.truth for r in judged), len(judged)),
            "gate": _share(sum(r.answer == r.truth for r in gate_judged), len(gate_judged)),
            "majority": _share(max(sum(r.truth == t for r in judged) for t in {r.truth for r in judged}),
                               len(judged)),
        },
        "ttft_p50_by_path": {k: None if v is None else round(v, 1) for k, v in by_path.items()},
    }


def _bound(pairs: list[tuple[float, bool]], confidence: float) -> float | None:
    return round(lower_bound(sum(ok for _, ok in pairs), len(pairs), confidence), 4) if pairs else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def markdown(rows: dict[str, dict[str, dict[str, Any]]], target: float, confidence: float) -> str:
    """One table: a column per model and workload."""
    cols = [(m, w) for m, ws in rows.items() for w in ws]
    head = "| | " + " | ".join(f"{m}, {w}" for m, w in cols) + " |"
    lines = [head, "| --- |" + " ---: |" * len(cols)]

    def row(label: str, fn) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(rows[m][w]) for m, w in cols) + " |")

    def guaranteed(f: dict[str, Any]) -> str:
        g = f["guaranteed"]
        if g["threshold"] is None:
            return "closed" + (" (too little evidence)" if g["reason"] and "too little" in g["reason"] else "")
        return f"{_pct(g['coverage'])} at gap {g['threshold']:.2f}"

    def bound(f: dict[str, Any]) -> str:
        g = f["guaranteed"]
        return "-" if g["precision"] is None else f"{_pct(g['precision'])} / {_pct(g['bound'])}"

    def rule(f: dict[str, Any], k: str) -> str:
        r = f["right_by_rule"]
        return "no rule" if r is None else _pct(r[k])

    row("requests (ready_exact)", lambda f: f"{f['requests']} ({f['ready_exact']})")
    row(f"coverage at the guaranteed target ({target:g} at {confidence:g})", guaranteed)
    row("precision / its lower bound at that threshold", bound)
    row("gate decisions checked (shadow): all / repeats left out",
        lambda f: f"{f['decisions']} / {f['decisions_without_repeats']}")
    row("agreement with the full computation: all / repeats left out",
        lambda f: f"{_pct(f['agreement'])} / {_pct(f['agreement_without_repeats'])}")
    row(f"  its lower bound at {confidence:g}: all / repeats left out",
        lambda f: f"{_pct(f['agreement_bound'])} / {_pct(f['agreement_without_repeats_bound'])}")
    row("real answers repeating the previous first token", lambda f: _pct(f["repeat_share"]))
    row("gate at logit gap 2 (no guarantee): fires, false accepts",
        lambda f: f"{f['fixed_gate']['fires']}, {f['fixed_gate']['false_accepts']}")
    row("  its precision: all / repeats left out",
        lambda f: f"{_pct(f['fixed_gate']['precision'])} / {_pct(f['fixed_gate']['precision_without_repeats'])} "
                  f"({f['fixed_gate']['fires_without_repeats']})")
    row("right by the rule: real / gate answers (majority)",
        lambda f: "no rule" if f["right_by_rule"] is None
        else f"{rule(f, 'real')} / {rule(f, 'gate')} ({rule(f, 'majority')})")
    paths = sorted({p for m, w in cols for p in rows[m][w]["ttft_p50_by_path"]},
                   key=lambda p: ("stateless", "cold", "session", "entry", "ready_exact", "gate").index(p)
                   if p in ("stateless", "cold", "session", "entry", "ready_exact", "gate") else 99)
    for p in paths:
        row(f"TTFT p50, {p} (ms)", lambda f, p=p: _ms(f["ttft_p50_by_path"].get(p)))
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, dict[str, Any]]], path: str | Path) -> Path:
    """Per model, one panel per workload: agreement with the full computation on all decisions
    and on non-repeated ones, each with its lower confidence bound (the black tick: how high it
    is known to be), and the share of real answers right by the workload's rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({w for ws in rows.values() for w in ws}, reverse=True)
    models = list(rows)
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.4 * len(workloads), 4.4), dpi=120, squeeze=False)
    series = [("agreement", "agreement_bound", "agreement, all decisions", "#1f77b4"),
              ("agreement_without_repeats", "agreement_without_repeats_bound", "agreement, repeats left out",
               "#ff7f0e"),
              ("real", None, "real answers right by the rule", "#2ca02c")]
    width = 0.8 / len(series)
    for ax, w in zip(axes[0], workloads, strict=True):
        for i, (key, bound_key, label, color) in enumerate(series):
            for j, m in enumerate(models):
                f = rows[m].get(w)
                value = None if f is None else ((f["right_by_rule"] or {}).get("real") if key == "real" else f[key])
                if value is None:
                    continue
                x = j + (i - (len(series) - 1) / 2) * width
                ax.bar(x, value, width, color=color, label=label if j == 0 or label not in
                       ax.get_legend_handles_labels()[1] else None)
                if bound_key and f[bound_key] is not None:
                    ax.plot([x - width / 2, x + width / 2], [f[bound_key]] * 2, color="k", lw=2)
        ax.axhline(GATE_TARGET, color="k", ls="--", lw=0.8)
        labels = [f"{m}\n(n={rows[m][w]['decisions']} / {rows[m][w]['decisions_without_repeats']})"
                  if w in rows[m] else m for m in models]
        ax.set_xticks(range(len(models)), labels, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{w} workload")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share (black tick: lower bound at 0.95)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("the gate by model size: n = decisions checked, all / repeats left out; dashed: the 0.95 target",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headstart.bench.study", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="MODEL:WORKLOAD=RECORDS.jsonl")
    p.add_argument("--target", type=float, default=GATE_TARGET)
    p.add_argument("--confidence", type=float, default=GATE_CONFIDENCE)
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--common", action="store_true",
                   help="compare each workload on the requests every model ran (a reduced set for some)")
    args = p.parse_args(argv)
    loaded: dict[str, dict[str, dict[str, ModeRun]]] = defaultdict(dict)  # workload -> model -> runs
    for item in args.inputs:
        label, _, path = item.partition("=")
        model, _, workload = label.partition(":")
        if not path or not workload:
            print(f"study: {item!r} is not MODEL:WORKLOAD=RECORDS.jsonl", file=sys.stderr)
            return 2
        loaded[workload][model] = load_runs(path)
    rows: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for workload, by_model in loaded.items():
        for model, runs in (common(by_model) if args.common else by_model).items():
            rows[model][workload] = figures(runs, args.target, args.confidence)
    text = markdown(rows, args.target, args.confidence)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
