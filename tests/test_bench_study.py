"""The gate study reads bench records of several models into one table and one plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from headstart.bench.study import figures, load_runs, main
from tests.test_bench_report import rec


def _write(path: Path, agree: list[bool], gaps: list[float]) -> Path:
    """A session of len(agree) + 1 stream questions in three modes; the real answer
    alternates Yes/No (no repeats) except that the last repeats the one before it."""
    answers = ["Yes", "No"] * 10
    answers[len(agree)] = answers[len(agree) - 1]
    rows = []
    for mode in ("stateless", "prepositioned", "gate"):
        for i in range(len(agree) + 1):
            fields = dict(truth="Yes", answer=answers[i], candidates=["Yes", "No"])
            if i == 0:
                rows.append(rec(mode, "s", i, "cold", 1000.0, [i], **fields))
            elif mode == "gate" and gaps[i - 1] >= 2.0:
                rows.append(rec(mode, "s", i, "gate", 1.0, [i], logit_gap=gaps[i - 1], verified=agree[i - 1], **fields))
            elif mode == "stateless":
                rows.append(rec(mode, "s", i, "cold", 1000.0, [i], **fields))
            else:
                shadow = {"gap": gaps[i - 1], "agree": agree[i - 1], "choice": 0 if answers[i] == "Yes" else 1}
                rows.append(rec(mode, "s", i, "entry", 100.0, [i], shadow=shadow, **fields))
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    return path


def test_figures_from_records(tmp_path: Path) -> None:
    f = figures(load_runs(_write(tmp_path / "a.jsonl", [True, False, True, True], [3.0, 1.0, 2.5, 0.5])))
    assert (f["requests"], f["decisions"], f["decisions_without_repeats"]) == (5, 4, 3)
    assert f["agreement"] == 0.75 and f["agreement_without_repeats"] == round(2 / 3, 4)
    assert f["guaranteed"]["threshold"] is None and "too little evidence" in f["guaranteed"]["reason"]
    assert f["guaranteed"]["coverage"] == 0.0
    assert f["fixed_gate"] == {"fires": 2, "false_accepts": 0, "precision": 1.0, "fires_without_repeats": 2,
                               "precision_without_repeats": 1.0}
    assert f["right_by_rule"] == {"real": 0.4, "gate": 0.0, "majority": 1.0}  # answers Yes No Yes No No
    assert f["ttft_p50_by_path"] == {"stateless": 1000.0, "cold": 1000.0, "entry": 100.0, "gate": 1.0}


def test_the_study_writes_one_table_and_one_png(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [True] * 3, [3.0, 3.0, 3.0])
    b = _write(tmp_path / "b.jsonl", [True, False, True], [3.0, 1.0, 2.5])
    md, png = tmp_path / "study.md", tmp_path / "study.png"
    assert main([f"small:stream={a}", f"big:stream={b}", "--markdown", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert text.startswith("| | small, stream | big, stream |")
    assert "| agreement with the full computation: all / repeats left out | 100% / 100% | 67% / 50% |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["nonsense"]) == 2
    # --common: each workload on the requests every model ran (b's last two left out)
    c = _write(tmp_path / "c.jsonl", [True, False], [3.0, 1.0])
    assert main([f"small:stream={a}", f"big:stream={c}", "--common", "--markdown", str(md)]) == 0
    assert "| requests (ready_exact) | 3 (0) | 3 (0) |" in md.read_text()
