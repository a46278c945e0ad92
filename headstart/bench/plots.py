"""PNG plots of a run: TTFT distributions per mode, and the gate's precision-coverage curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headstart.bench.runner import ModeRun

COLORS = {
    "stateless": "#7f7f7f",
    "prefix_cache": "#1f77b4",
    "session": "#2ca02c",
    "prepositioned": "#ff7f0e",
    "gate": "#d62728",
    "llamacpp": "#9467bd",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ttft_cdf(runs: dict[str, ModeRun], title: str, path: Path) -> Path:
    """Empirical CDF of TTFT per mode on a log time axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, run in runs.items():
        values = sorted(max(r.ttft_ms, 1e-3) for r in run.records)
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=f"{name} (n={len(values)})", color=COLORS.get(name.split(":")[0]))
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def gate_curve(gate: dict[str, Any], title: str, path: Path) -> Path:
    """Precision of gate answers against coverage (ready_exact + gate, share of all
    requests) as the threshold moves; the target precision and the operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    cal = gate.get("calibration") or {}
    curve = [p for p in cal.get("curve", []) if p["precision"] is not None]
    if curve:
        xs = [p["coverage"] for p in curve]
        ys = [p["precision"] for p in curve]
        label = f"precision: agrees with the full computation ({cal.get('rests_on', 0)} requests)"
        ax.plot(xs, ys, marker=".", color=COLORS["gate"], label=label)
        for p in curve[:: max(1, len(curve) // 8)]:
            ax.annotate(f"{p['threshold']:.1f}", (p["coverage"], p["precision"]), fontsize=7, alpha=0.7,
                        textcoords="offset points", xytext=(3, 3))
        right = [p for p in curve if p.get("correct") is not None]
        if right:
            ax.plot([p["coverage"] for p in right], [p["correct"] for p in right], marker=".", linestyle="--",
                    color="#2ca02c", label="gate answers right by the workload's rule")
        ax.axhline(cal["target"], color="k", linestyle="--", linewidth=0.8, label=f"target {cal['target']:g}")
    else:
        ax.text(0.5, 0.5, "no request had a ready position to judge", ha="center", va="center",
                transform=ax.transAxes)
    if gate.get("coverage") is not None and gate.get("precision") is not None:
        ax.plot([gate["coverage"]], [gate["precision"]], "o", color="k",
                label=f"gate mode at {gate['threshold']:g} (measured)")
    ax.set_xlabel("coverage (share of requests answered from a ready position)")
    ax.set_ylabel("share of gate answers")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(runs: dict[str, ModeRun], report: dict[str, Any], out: str | Path) -> list[Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    name = report["workload"]["name"]
    model = report["model"]["name"]
    paths = [ttft_cdf(runs, f"TTFT per mode: {name} workload, {model}", folder / f"{name}-ttft-cdf.png")]
    if report.get("gate"):
        paths.append(gate_curve(report["gate"], f"Gate precision vs coverage: {name}, {model}",
                                folder / f"{name}-gate-curve.png"))
    return paths


def replot(report_path: str | Path, records_path: str | Path, out: str | Path) -> list[Path]:
    """Draw the plots again from a saved report (``--json``) and its records (``--records``)."""
    import json

    from headstart.bench.runner import Record

    report = json.loads(Path(report_path).read_text())
    by_mode: dict[str, list[Record]] = {}
    fields = set(Record.__dataclass_fields__)
    for line in Path(records_path).read_text().splitlines():
        raw = json.loads(line)
        by_mode.setdefault(raw["mode"], []).append(Record(**{k: v for k, v in raw.items() if k in fields}))
    runs = {
        name: ModeRun(name, "", False, by_mode.get(name, []), 0.0, {}, {}, [])
        for name in report["modes"]
    }
    return write_plots(runs, report, out)
