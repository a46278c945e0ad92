"""``headstart bench --model-only`` end to end on the tiny model: every mode of the runner is
measured beside transformers, and the table and the plot show each (the figures themselves
are the README's, from runs on the real models)."""

from __future__ import annotations

from pathlib import Path

from headstart.bench import model_only
from headstart.model import HFBackend


def test_every_runner_mode_is_measured_tabled_and_plotted(tiny: HFBackend, tmp_path: Path) -> None:
    r = model_only.run_model_only(tiny, contexts=[16, 40], batches=[1, 2], reps=1, prefill_tokens=24, progress=False)
    modes = ["transformers", "runner", "runner mkl", "runner tiled", "runner fp16"]
    assert list(r["decode_ms"]) == modes
    assert all(ms > 0 for row in r["decode_ms"].values() for ms in row.values())
    assert all(set(row) == {16, 40} for row in r["decode_ms"].values())
    assert list(r["prefill_tok_s"]) == modes
    assert list(r["batched_decode_tok_s"]) == ["runner", "runner mkl", "runner fp16"]
    text = model_only.format_table(r)
    for mode in modes[1:]:
        assert f"| {mode} |" in text
    assert "runner fp16 tok/s (vs 1)" in text
    assert model_only.plot(r, tmp_path / "model-only.png").stat().st_size > 0
