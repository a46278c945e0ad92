"""Many sequences, one forward: feeds -> flattened tensors -> the logits each feed asked for.

A *feed* is a sequence, the ids to append to it and how many of its last rows' logits
are wanted. The runner allocates the rows in the pool, builds the flattened ids,
positions, slot mapping and per-sequence spans, and runs the model once.

Batch invariance on the CPU: torch 2.13's CPU GEMM (MKL) computes rows in groups of four,
and a last group of one to three rows goes through other kernels that give other bits
(measured here: row 4 of a 5-row product differs from row 4 of a 600-row one, rows of
full groups never do). With ``min_rows=MIN_ROWS`` every product runs on a multiple of four
rows (the padding rows write their K/V to the pool's scratch block and are never read), and
with the ``tiled`` attention kernel a sequence's logits are then the same bits alone or
beside others, and chunked prefill equals prefill at once (tests/test_runner.py, on both
real models): *exact mode*. It costs speed here (this CPU's MKL runs a 4-row product about
three times slower than the 1-row one, and the tiled kernel is slower than SDPA), so the
default is the fast mode, ``min_rows=1`` with ``sdpa``: exact at the level the engine has
always promised (greedy output equal to a cold computation), not bit for bit across
chunkings. ``min_rows=MIN_ROWS`` with ``sdpa`` keeps batch invariance but not chunk
invariance.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from headstart.kv.pool import SCRATCH, BlockPool, Reservation
from headstart.kv.seq import KVSeq
from headstart.model.arch import ArchConfig
from headstart.model.attention import KERNELS, build_meta, varlen_usable
from headstart.model.hf import HFBackend
from headstart.model.hf_runner import HFRunner
from headstart.model.llama import Llama
from headstart.model.weights import from_module

MIN_ROWS = 4  # rows per product group: ``min_rows=MIN_ROWS`` with the tiled kernel is exact mode


@dataclass
class Feed:
    """What one sequence needs computed: ``ids`` appended, logits of its last ``keep`` rows."""

    seq: KVSeq
    ids: list[int]
    keep: int = 1
    reservation: Reservation | None = None


class Runner:
    """The own forward bound to its pool."""

    def __init__(self, model: Llama, pool: BlockPool, min_rows: int = 1, kernel: str = "sdpa") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        self.model = model
        self.min_rows = min_rows
        self.kernel = kernel
        self.pool = pool
        self.forwards = 0

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Append every feed's ids to its sequence and return, per feed, ``(keep, vocab)`` logits."""
        if not feeds or any(not f.ids for f in feeds):
            raise ValueError("every feed needs at least one token")
        starts: list[int] = []
        try:
            for f in feeds:
                starts.append(f.seq.append(f.ids, f.reservation))
            return self._run(feeds, starts)
        except BaseException:
            for f, start in zip(feeds, starts, strict=False):
                f.seq.crop(start)
            raise

    def _run(self, feeds: list[Feed], starts: list[int]) -> list[torch.Tensor]:
        pool, device = self.pool, self.model.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[tuple[int, int, list[int], int]] = []
        rows: list[int] = []
        for f, start in zip(feeds, starts, strict=True):
            n = len(f.ids)
            q = len(ids)
            ids += f.ids
            positions += range(start, start + n)
            slots += f.seq.slots(start, n)
            spans.append((q, n, f.seq.blocks, start + n))
            keep = min(f.keep, n)
            rows += range(q + n - keep, q + n)
        pad = -len(ids) % self.min_rows
        if pad > 0:
            ids += [0] * pad
            positions += [0] * pad
            slots += [SCRATCH * pool.block_size + i % pool.block_size for i in range(pad)]
        rows += [rows[-1]] * (-len(rows) % self.min_rows)
        group = self.model.arch.heads // self.model.arch.kv_heads
        meta = build_meta(spans, pool.block_size, group, device, varlen_usable(device, self.model.dtype), self.kernel)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        logits = self.model.forward(
            as_tensor(ids), as_tensor(positions), as_tensor(slots), meta, as_tensor(rows), pool
        )
        self.forwards += 1
        out: list[torch.Tensor] = []
        at = 0
        for f in feeds:
            keep = min(f.keep, len(f.ids))
            rows_of_feed = logits[at : at + keep]
            # A copy when the buffer holds more (padding, other feeds): a kept row must not
            # pin the whole step's logits.
            out.append(rows_of_feed if rows_of_feed.shape[0] == logits.shape[0] else rows_of_feed.clone())
            at += keep
        return out


_models: WeakKeyDictionary[HFBackend, Llama] = WeakKeyDictionary()


def from_backend(
    backend: HFBackend,
    *,
    kv_budget: int,
    block_size: int = 16,
    min_rows: int = 1,
    kernel: str = "sdpa",
    physical_bytes: int | None = None,
) -> Runner | HFRunner:
    """The runner for ``backend``'s model with a pool of ``kv_budget`` bytes (at most
    ``physical_bytes`` allocated): the own forward, sharing the model's weights, for llama
    and qwen2 (fused once per backend); transformers over the pool for anything else."""
    config = backend.model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    param = next(backend.model.parameters())
    pool = BlockPool(
        config.num_hidden_layers,
        kv_heads,
        head_dim,
        block_size=block_size,
        budget_bytes=kv_budget,
        dtype=param.dtype,
        device=param.device,
        physical_bytes=physical_bytes,
    )
    model = _models.get(backend)
    if model is None:
        try:
            arch = ArchConfig.from_dict(backend.model.config.to_dict())
        except ValueError:  # another architecture, or a RoPE variant the own forward lacks
            return HFRunner(backend, pool)
        model = _models[backend] = Llama(arch, from_module(backend.model, arch))
    return Runner(model, pool, min_rows, kernel)
