"""Turn the records of a run into the report: figures per mode, the gate, honesty checks.

Everything here is a pure function of the records, so it is tested without a model.
Times are summarised with nearest-rank percentiles; a figure with no data is ``None``,
never a made-up zero. Ratios put each mode's TTFT p50 over a baseline's.
"""

from __future__ import annotations

import os
import platform
from collections import Counter
from typing import Any

from headstart.bench.runner import ModeRun, Record
from headstart.config import GATE_CONFIDENCE, PREDICTOR
from headstart.engine.gate import calibrate
from headstart.stats import PATHS, percentile, summary

REFERENCE = "stateless"


def machine() -> dict[str, Any]:
    """Enough about the machine to read the numbers by."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _times(values: list[float]) -> dict[str, float | None]:
    s = summary(values)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}


def _share(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def mismatches(run: ModeRun, reference: ModeRun | None) -> dict[str, int | None]:
    """Requests whose greedy output differs from the reference's, whole and first token."""
    if reference is None:
        return {"mismatches": None, "first_token_mismatches": None, "compared": 0}
    ref = {r.key: r for r in reference.records}
    whole = first = compared = 0
    for r in run.records:
        other = ref.get(r.key)
        if other is None:
            continue
        compared += 1
        whole += r.tokens != other.tokens
        first += r.first_token() != other.first_token()
    return {"mismatches": whole, "first_token_mismatches": first, "compared": compared}


def repeats(reference: list[Record]) -> dict[tuple[str, int], bool]:
    """For each request after a session's first: does the real answer merely repeat the
    previous answer's first token (or candidate)? A model that ignores its input does."""
    by_key = {r.key: r for r in reference}
    out = {}
    for r in reference:
        prev = by_key.get((r.session, r.step - 1))
        if prev is not None:
            out[r.key] = r.first_token() is not None and r.first_token() == prev.first_token()
    return out


def background(run: ModeRun) -> dict[str, Any]:
    """Background tokens: computed, reused by a request, wasted (dropped, or never used by
    the time the sessions ended), total and per request."""
    bg = run.background
    n = len(run.records)
    computed, reused, wasted = bg.get("computed", 0), bg.get("reused", 0), bg.get("wasted", 0)
    # Work no request used before the run ended (the last turn's pre-positioning, a ready
    # position never asked for) is wasted too: the sessions are over.
    left = max(0, computed - reused - wasted)
    totals = {"computed": computed, "reused": reused, "wasted": wasted + left}
    per = {k: round(v / n, 1) if n else None for k, v in totals.items()}
    return {**totals, "per_request": per, "left_unused_at_end": left}


def mode_report(run: ModeRun, reference: ModeRun | None) -> dict[str, Any]:
    recs = run.records
    paths = Counter(r.path for r in recs)
    hits = paths["ready_exact"] + paths["gate"]
    out: dict[str, Any] = {
        "description": run.description,
        "exact": run.exact,
        "requests": len(recs),
        "ttft_ms": _times([r.ttft_ms for r in recs]),
        "ttft_p50_by_path": {p: percentile([r.ttft_ms for r in recs if r.path == p], 50) for p in sorted(paths)},
        "decided_ms": _times([r.decided_ms for r in recs]),
        "e2e_ms": _times([r.e2e_ms for r in recs]),
        "paths": {p: paths[p] for p in [*PATHS, *sorted(set(paths) - set(PATHS))] if paths[p]},
        **mismatches(run, reference),
        "background_tokens": background(run),
        "foreground_wait_ms": {
            k: v for k, v in _times([r.background_wait_ms for r in recs]).items() if k in ("p50", "p99", "mean")
        },
        "queue_ms": {k: v for k, v in _times([r.queue_ms for r in recs]).items() if k in ("p50", "p99", "mean")},
        "prompt_tokens": sum(r.prompt_tokens for r in recs),
        "cached_tokens": sum(r.cached_tokens for r in recs),
        "completion_tokens": sum(len(r.tokens) for r in recs),
        "coverage": _share(hits, len(recs)),
        "overlapped": _share(sum(r.overlapped for r in recs), len(recs)),
        "settle_ms": _times([r.settle_ms for r in recs]),
        "wall_s": round(run.wall_s, 2),
        **run.extra,
    }
    judged = [r for r in recs if r.truth is not None]
    if judged:
        out["correct"] = {"share": _share(sum(r.answer == r.truth for r in judged), len(judged)), "n": len(judged)}
    return out


def calibration_figures(
    pairs: list[tuple[float, bool]],
    target: float,
    exact_hits: int,
    requests: int,
    confidence: float = GATE_CONFIDENCE,
) -> dict[str, Any]:
    """:func:`headstart.engine.gate.calibrate` on ``pairs`` (the guaranteed gate's own math), with
    coverage also as a share of all ``requests`` (exact hits count as covered at every
    threshold)."""
    cal = calibrate(pairs, target, confidence, curve_bounds=True)
    fired = cal.fired
    return {
        "target": target,
        "confidence": confidence,
        "threshold": cal.threshold,
        "precision": None if cal.precision is None else round(cal.precision, 4),
        "bound": None if cal.bound is None else round(cal.bound, 4),
        "reason": cal.reason,
        "fired": fired,
        "rests_on": cal.samples,
        "coverage_of_pairs": round(cal.coverage, 4),
        "coverage": _share(exact_hits + fired, requests),
        "curve": [
            {
                "threshold": round(p.threshold, 4),
                "fired": p.fired,
                "precision": None if p.precision is None else round(p.precision, 4),
                "bound": None if p.bound is None else round(p.bound, 4),
                "coverage": _share(exact_hits + p.fired, requests),
            }
            for p in cal.curve
        ],
    }


def shadow_pairs(run: ModeRun, repeat: dict[tuple[str, int], bool] | None = None) -> list[tuple[float, bool]]:
    """(gap, agreed) of every request that had a ready position and a different prompt:
    fired gate answers and the gate's silent verdicts on exact paths. ``repeat`` given:
    only the requests whose real answer does not repeat the previous one."""
    out = []
    for r in run.records:
        if repeat is not None and repeat.get(r.key, False):
            continue
        if r.path == "gate" and r.logit_gap is not None and r.verified is not None:
            out.append((r.logit_gap, bool(r.verified)))
        elif r.shadow is not None:
            out.append((float(r.shadow["gap"]), bool(r.shadow["agree"])))
    return out


def add_correctness(curve: list[dict[str, Any]], records: list[Record]) -> None:
    """Where the workload has a rule: at each threshold, the share of the gate's answers that
    are right by it (precision only says the model agreed with itself)."""
    judged = []
    for r in records:
        gap = r.logit_gap if r.path == "gate" else (r.shadow or {}).get("gap")
        answer = r.gate_answer()
        if r.truth is not None and gap is not None and answer is not None:
            judged.append((float(gap), answer == r.truth))
    if not judged:
        return
    for point in curve:
        fired = [ok for gap, ok in judged if gap >= point["threshold"]]
        point["correct"] = _share(sum(fired), len(fired))


def gate_report(
    runs: dict[str, ModeRun], target: float, confidence: float = GATE_CONFIDENCE
) -> dict[str, Any] | None:
    """The gate at its operating threshold, and where calibration would put it.

    Live figures come from the ``gate`` mode. Calibration uses the ``prepositioned`` run,
    whose answers are all exact, so the pairs it records are what the gate *would* have
    done on every request with a ready position, unbiased by earlier false accepts.
    """
    gate_run = runs.get("gate")
    cal_run = runs.get("prepositioned") or gate_run
    if gate_run is None and cal_run is None:
        return None
    reference = runs.get(REFERENCE) or cal_run
    assert reference is not None
    rep = repeats(reference.records)
    out: dict[str, Any] = {}
    if gate_run is not None:
        recs = gate_run.records
        fired = [r for r in recs if r.path == "gate"]
        checked = [r for r in fired if r.verified is not None]
        good = sum(bool(r.verified) for r in checked)
        fresh = [r for r in checked if not rep.get(r.key, False)]
        hits = sum(r.path in ("ready_exact", "gate") for r in recs)
        out.update(
            {
                "threshold": gate_run.gate["threshold"],
                "fires": len(fired),
                "coverage": _share(hits, len(recs)),
        "overlapped": _share(sum(r.overlapped for r in recs), len(recs)),
                "precision": _share(good, len(checked)),
                "false_accepts": len(checked) - good,
                "precision_without_repeats": _share(sum(bool(r.verified) for r in fresh), len(fresh)),
                "fires_without_repeats": len(fresh),
                "requests": len(recs),
            }
        )
    else:
        out.update({"threshold": None, "fires": 0, "coverage": None, "precision": None, "false_accepts": 0})
    out["repeat_share"] = _share(sum(rep.values()), len(rep))
    out["repeats_counted_on"] = len(rep)
    if cal_run is not None:
        exact_hits = sum(r.path == "ready_exact" for r in cal_run.records)
        n = len(cal_run.records)
        cal = calibration_figures(shadow_pairs(cal_run), target, exact_hits, n, confidence)
        add_correctness(cal["curve"], cal_run.records)
        out["calibration"] = {"source": cal_run.name, **cal}
        fresh_pairs = shadow_pairs(cal_run, rep)
        out["calibration_without_repeats"] = {
            k: v
            for k, v in calibration_figures(fresh_pairs, target, exact_hits, n, confidence).items()
            if k != "curve"
        }
    judged = [r for r in reference.records if r.truth is not None]
    if judged:
        out["correctness"] = correctness(runs, reference)
    return out


def correctness(runs: dict[str, ModeRun], reference: ModeRun) -> dict[str, Any]:
    """Right answers against the workload's rule: the model's real answers, the gate's
    answers, and how lopsided the answers are (a model saying "Yes" to everything)."""
    judged = [r for r in reference.records if r.truth is not None]
    answers = Counter(r.answer for r in judged)
    truths = Counter(r.truth for r in judged)
    out: dict[str, Any] = {
        "real_answers": {"correct": _share(sum(r.answer == r.truth for r in judged), len(judged)), "n": len(judged)},
        "answer_counts": dict(answers),
        "truth_counts": dict(truths),
        "majority_baseline": _share(max(truths.values()), len(judged)),
    }
    gate_run = runs.get("gate")
    if gate_run is not None:
        fired = [r for r in gate_run.records if r.path == "gate" and r.truth is not None]
        out["gate_answers"] = {"correct": _share(sum(r.answer == r.truth for r in fired), len(fired)), "n": len(fired)}
        exact = [r for r in gate_run.records if r.path == "ready_exact" and r.truth is not None]
        out["ready_exact_answers"] = {
            "correct": _share(sum(r.answer == r.truth for r in exact), len(exact)),
            "n": len(exact),
        }
    return out


def predictor_report(
    runs: dict[str, ModeRun],
    target: float,
    default: str = PREDICTOR,
    confidence: float = GATE_CONFIDENCE,
) -> dict[str, Any]:
    """Coverage at the target precision per predicted delta (``prepositioned:PREDICTOR`` runs),
    with the background tokens each costs per request."""
    out = {}
    for name, run in runs.items():
        if not name.startswith("prepositioned"):
            continue
        predictor = name.partition(":")[2] or default
        exact_hits = sum(r.path == "ready_exact" for r in run.records)
        cal = calibration_figures(shadow_pairs(run), target, exact_hits, len(run.records), confidence)
        out[predictor] = {
            "ready_exact": exact_hits,
            "threshold": cal["threshold"],
            "coverage_at_target": cal["coverage"],
            "precision": cal["precision"],
            "rests_on": cal["rests_on"],
            "ttft_p50_ms": percentile([r.ttft_ms for r in run.records], 50),
            "background_tokens_per_request": background(run)["per_request"],
        }
    return out


def ratios(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each mode's TTFT p50 and e2e p50 as a fraction of each baseline's (below 1: faster)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, m in modes.items():
        row: dict[str, float | None] = {}
        for base in ("stateless", "prefix_cache"):
            if base in modes:
                for metric in ("ttft_ms", "e2e_ms"):
                    a, b = m[metric]["p50"], modes[base][metric]["p50"]
                    row[f"{metric[:-3]}_p50_over_{base}"] = round(a / b, 4) if a is not None and b else None
        out[name] = row
    return out


def build_report(
    workload: dict[str, Any],
    model: dict[str, Any],
    runs: dict[str, ModeRun],
    *,
    target: float,
    clients: int,
    command: str | None = None,
    notes: list[str] | None = None,
    predictor: str = PREDICTOR,
    confidence: float = GATE_CONFIDENCE,
) -> dict[str, Any]:
    reference = runs.get(REFERENCE)
    modes = {name: mode_report(run, reference if name != REFERENCE else None) for name, run in runs.items()}
    report: dict[str, Any] = {
        "workload": workload,
        "model": model,
        "machine": machine(),
        "clients": clients,
        "command": command,
        "modes": modes,
        "ratios": ratios(modes),
        "gate": gate_report(runs, target, confidence),
        "notes": notes or [],
    }
    preds = predictor_report(runs, target, predictor, confidence)
    if len(preds) > 1:
        report["predictors"] = preds
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Exact modes whose outputs differ from ``stateless``, or that were not compared on
    every request (0 mismatches of nothing compared proves nothing): the run must fail."""
    bad = []
    for name, m in report["modes"].items():
        if not m.get("exact") or name == REFERENCE:
            continue
        if m.get("mismatches"):
            bad.append(f"{name}: {m['mismatches']} of {m['compared']} outputs differ from {REFERENCE}")
        elif m.get("compared") != m.get("requests"):
            bad.append(f"{name}: only {m.get('compared')} of {m.get('requests')} outputs compared with {REFERENCE}")
    return bad


# -- Markdown --------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables for a terminal or a README."""
    w = report["workload"]
    lines = [
        f"**{w['name']}** workload, seed {w['seed']}: {w['sessions']} sessions, {w['requests']} requests, "
        f"{report['clients']} concurrent clients, gaps {w['gaps']}; model {report['model']['name']} on "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores, {report['model'].get('device', '?')}, "
        f"{report['machine']['torch_threads']} torch threads).",
        "",
        "| mode | TTFT p50 | p90 | p99 | mean | decided p50 | e2e p50 | e2e mean | paths | mismatches "
        "| bg tokens/req computed / reused / wasted | wait behind bg p50 / p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, m in report["modes"].items():
        t, e, d = m["ttft_ms"], m["e2e_ms"], m["decided_ms"]
        paths = " ".join(f"{p} {n}" for p, n in m["paths"].items())
        per = m["background_tokens"]["per_request"]
        bg = "-" if not m["background_tokens"]["computed"] else f"{per['computed']} / {per['reused']} / {per['wasted']}"
        mm = "-" if m["mismatches"] is None else str(m["mismatches"]) + ("" if m["exact"] else " (not exact)")
        fw = m["foreground_wait_ms"]
        lines.append(
            f"| {name} | {_ms(t['p50'])} | {_ms(t['p90'])} | {_ms(t['p99'])} | {_ms(t['mean'])} | {_ms(d['p50'])} "
            f"| {_ms(e['p50'])} | {_ms(e['mean'])} | {paths} | {mm} | {bg} | {_ms(fw['p50'])} / {_ms(fw['p99'])} |"
        )
    lines.append("")
    lines.append("Times in ms from arrival at the engine (the peer: at the HTTP client).")
    rat = report.get("ratios", {})
    rows = [
        (name, r)
        for name, r in rat.items()
        if name not in ("stateless",) and any(v is not None for v in r.values())
    ]
    if rows:
        lines += [
            "",
            "| mode | TTFT p50 / stateless | TTFT p50 / prefix_cache | e2e p50 / stateless | e2e p50 / prefix_cache |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in rows:
            def f(key: str, r: dict[str, float | None] = r) -> str:
                v = r.get(key)
                return "-" if v is None else f"{v:.3f}"

            lines.append(
                f"| {name} | {f('ttft_p50_over_stateless')} | {f('ttft_p50_over_prefix_cache')} "
                f"| {f('e2e_p50_over_stateless')} | {f('e2e_p50_over_prefix_cache')} |"
            )
    g = report.get("gate")
    if g:
        lines.append("")
        if g.get("requests") is not None:
            where = "guaranteed (precision bound)" if g["threshold"] is None else f"at logit gap {g['threshold']:g}"
            lines.append(
                f"Gate {where}: fired {g['fires']} of {g['requests']} requests, "
                f"coverage {_pct(g['coverage'])} (ready_exact + gate), precision {_pct(g['precision'])}, "
                f"false accepts {g['false_accepts']}; without answers that repeat the previous one: precision "
                f"{_pct(g.get('precision_without_repeats'))} on {g.get('fires_without_repeats', 0)} fires. "
                f"Real answers repeating the previous first token: {_pct(g['repeat_share'])} "
                f"of {g['repeats_counted_on']}."
            )
        cal = g.get("calibration")
        if cal:
            thr = (f"closed ({cal['reason']})" if cal["threshold"] is None
                   else f"logit gap {cal['threshold']:.2f}, precision {_pct(cal['precision'])} (bound "
                        f"{_pct(cal['bound'])})")
            lines.append(
                f"Guaranteed calibration on the {cal['source']} run, lower bound of precision >= {cal['target']:g} "
                f"at confidence {cal['confidence']:g}: {thr}, coverage {_pct(cal['coverage'])}, resting on "
                f"{cal['rests_on']} requests with a ready position ({cal['fired']} would fire)."
            )
            cw = g.get("calibration_without_repeats")
            if cw:
                thr = "closed" if cw["threshold"] is None else f"logit gap {cw['threshold']:.2f}"
                lines.append(f"Same, repeats left out: {thr}, resting on {cw['rests_on']} requests.")
        c = g.get("correctness")
        if c:
            lines.append(
                f"Right answers by the workload's rule: real answers {_pct(c['real_answers']['correct'])} of "
                f"{c['real_answers']['n']} (always answering the majority: {_pct(c['majority_baseline'])}; "
                f"answers given: {c['answer_counts']}); gate answers "
                f"{_pct(c.get('gate_answers', {}).get('correct'))} of {c.get('gate_answers', {}).get('n', 0)}."
            )
    preds = report.get("predictors")
    if preds:
        lines += [
            "",
            "| predicted delta | ready_exact | threshold at target | coverage at target | rests on "
            "| TTFT p50 | bg tokens/req computed / wasted |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p, v in preds.items():
            thr = "-" if v["threshold"] is None else f"{v['threshold']:.2f}"
            bg = v["background_tokens_per_request"]
            lines.append(
                f"| {p} | {v['ready_exact']} | {thr} | {_pct(v['coverage_at_target'])} | {v['rests_on']} "
                f"| {_ms(v['ttft_p50_ms'])} | {bg['computed']} / {bg['wasted']} |"
            )
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
