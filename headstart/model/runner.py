"""Many sequences, one forward: feeds -> flattened tensors -> the logits each feed asked for.

A *feed* is a sequence, the ids to append to it and how many of its last rows' logits
are wanted. The runner allocates the rows in the pool, builds the flattened ids,
positions, slot mapping and per-sequence spans, and runs the model once.

Bitwise invariance on the CPU: two choices make the modes.
- ``linear`` (llama.py): ``onednn`` (the default) runs the linear layers through oneDNN, whose
  rows do not depend on the product's row count; ``mkl`` is F.linear, transformers' own kernel
  (its bits equal the oracle's), and ``fp16`` fbgemm's kernel on half-precision weights (opt-in:
  about half the decode time, logits ~1e-2 from fp32's); both give the rows of a last partial
  row group other bits, so there every product is padded (``pad_rows``; the padding rows write
  their K/V to the pool's scratch block and are never read). Where oneDNN does not run (CUDA,
  half precision) ``onednn`` means ``mkl``.
- ``kernel`` (attention.py): ``sdpa`` (the default) runs each sequence alone, so a sequence's
  logits are the same bits alone or beside any others; ``tiled`` also gives a prompt
  prefilled in chunks the same bits as at once, at a cost in speed.
The default (oneDNN, sdpa) is *batch invariant*; ``tiled`` with either linear kernel is batch
and *chunk invariant*; ``mkl`` with ``tiled`` also matches transformers in every row within
1e-4 (oneDNN's other summation order moves early prompt rows up to ~1.6e-4).
tests/test_runner.py proves each on both real models.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from headstart.config import ATTENTION, LINEAR
from headstart.kv.pool import SCRATCH, BlockPool, Reservation
from headstart.kv.seq import KVSeq
from headstart.model.arch import ArchConfig
from headstart.model.attention import KERNELS, build_meta, varlen_usable
from headstart.model.hf import HFBackend
from headstart.model.hf_runner import HFRunner
from headstart.model.llama import Llama, pad_rows
from headstart.model.weights import from_module


@dataclass
class Feed:
    """What one sequence needs computed: ``ids`` appended, logits of its last ``keep`` rows."""

    seq: KVSeq
    ids: list[int]
    keep: int = 1
    reservation: Reservation | None = None


class Runner:
    """The own forward bound to its pool."""

    def __init__(self, model: Llama, pool: BlockPool, kernel: str = ATTENTION, linear: str = LINEAR) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        self.model = model
        self.linear = model.pack(linear)  # the kernel that runs
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
        pad = pad_rows(self.linear, len(ids))
        if pad > 0:
            ids += [0] * pad
            positions += [0] * pad
            slots += [SCRATCH * pool.block_size + i % pool.block_size for i in range(pad)]
        rows += [rows[-1]] * pad_rows(self.linear, len(rows))
        group = self.model.arch.heads // self.model.arch.kv_heads
        meta = build_meta(spans, pool.block_size, group, device, varlen_usable(device, self.model.dtype), self.kernel)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        logits = self.model.forward(
            as_tensor(ids), as_tensor(positions), as_tensor(slots), meta, as_tensor(rows), pool, self.linear
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
    kernel: str = ATTENTION,
    linear: str = LINEAR,
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
        paged=varlen_usable(param.device, param.dtype),
    )
    model = _models.get(backend)
    if model is None:
        try:
            arch = ArchConfig.from_dict(backend.model.config.to_dict())
        except ValueError:  # another architecture, or a RoPE variant the own forward lacks
            return HFRunner(backend, pool)
        model = _models[backend] = Llama(arch, from_module(backend.model, arch))
    return Runner(model, pool, kernel, linear)
