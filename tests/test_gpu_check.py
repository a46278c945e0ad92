"""The CPU-side parts of scripts/gpu_check.py and of the CUDA attention path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from headstart.kv.pool import SCRATCH
from headstart.model import HFBackend
from headstart.model.attention import build_meta, varlen_usable
from headstart.model.runner import from_backend


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_invariance_check_passes_on_the_cpu(tiny: HFBackend) -> None:
    gpu_check = _script()
    runner = from_backend(tiny, kv_budget=4096 * tiny.info.kv_bytes_per_token, kernel="tiled")
    assert gpu_check.invariance(tiny, runner) == []
    assert runner.pool.used == 0  # the check gives back every block


def test_varlen_metadata_describes_the_paged_batch() -> None:
    spans = [(0, 3, [5, 6, 9], 40), (3, 1, [2], 7)]
    meta = build_meta(spans, 16, 3, torch.device("cpu"), use_varlen=True)
    v = meta.varlen
    assert v is not None and v.rows == 4 and v.max_q == 3 and v.max_k == 40
    assert v.cu_seq_q.tolist() == [0, 3, 4] and v.cu_seq_q.dtype == torch.int32
    assert v.seqused_k.tolist() == [40, 7]
    assert v.block_table.tolist() == [[5, 6, 9], [2, SCRATCH, SCRATCH]] and v.block_table.dtype == torch.int32
    assert build_meta(spans, 16, 3, torch.device("cpu")).varlen is None
    assert not varlen_usable(torch.device("cpu"), torch.bfloat16)
    assert not varlen_usable(torch.device("cuda"), torch.float32)
    assert varlen_usable(torch.device("cuda"), torch.float16)
