"""Attention over the paged pool for a flattened batch of sequences, batch- and chunk-invariant.

Keys are read in *tiles*: the pool's blocks, aligned to absolute positions. Each tile gives
a softmax partial (its max, its sum and its weighted values) and the partials are combined
over tiles. A tile past a query's causal limit contributes exactly zero (weight
``exp(-inf) = 0``, times finite rows), and every product has a fixed inner length (the head
dim, or the tile), so a query row gets the same bits however many tiles, queries or other
sequences the step holds: a prompt prefilled in chunks equals it prefilled at once, and a
sequence in a batch equals it alone. That is what lets every sequence of a step share one
set of tensor ops per layer (padded to the longest table, with the scratch block), where a
stock kernel (SDPA) gives other bits for other query counts.

The price is speed: on this 2-core CPU the tiled kernel is several times slower than SDPA
(many small products where SDPA runs one fused loop). So there are two CPU kernels:
``tiled`` (bitwise batch- and chunk-invariant) and ``sdpa``, the default (each sequence
alone through ``scaled_dot_product_attention`` with a lower-right causal mask, reading its
keys in place from the head-major pool when its blocks are consecutive).

``sdpa`` is batch-invariant (a sequence's inputs never depend on the others) but **not
chunk-invariant**: torch's CPU flash kernel splits queries and keys into blocks whose sizes
depend on the query and key counts, so a prompt prefilled in chunks differs from it
prefilled at once in the last bits (seen on prompts of a few hundred tokens). The
engine's promise there is greedy equality with a cold computation, not bits: both sides
stay within 1e-4 of transformers, so a greedy token can differ only where the top two
logits are that close, and the exactness tests check the tokens. Where bits across
chunkings are needed, ``kernel="tiled"`` (``from_backend``) is the fallback, tested bitwise
on both real models (tests/test_runner.py). On CUDA in half precision, the paged flash
kernel (``varlen_attn`` with a block table) over the pool's paged layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headstart.kv.pool import SCRATCH, BlockPool

# Query rows per product (G query heads per KV head times rows) a multiple of this: the
# CPU GEMM gives other bits to rows in a last group of fewer than four (see runner.py).
ROW_GROUP = 4


KERNELS = ("sdpa", "tiled")


@dataclass
class SeqView:
    """One sequence for the ``sdpa`` kernel: its query rows and the keys they see."""

    q_start: int
    q_len: int
    kv_len: int
    blocks: tuple[int, int] | torch.Tensor  # (first, count) when consecutive (a view), else a gather
    mask: torch.Tensor | None  # (q_len, kv_len) lower-right causal; None for one query


@dataclass
class AttnMeta:
    """Where every sequence of one forward sits, built once per forward."""

    gather: torch.Tensor  # (B, qmax) flattened query rows per sequence (pads repeat a real row)
    tables: torch.Tensor  # (B, tiles) block numbers, padded with the scratch block
    blocked: torch.Tensor  # (B, 1, tiles, 1, qmax, tile) True where a query must not look
    scatter_from: torch.Tensor  # rows of the (B * qmax) output that are real queries
    scatter_to: torch.Tensor  # their flattened rows
    varlen: VarlenMeta | None = None  # CUDA with fp16/bf16: the paged flash kernel instead
    seqs: list[SeqView] | None = None  # the sdpa kernel instead


@dataclass
class VarlenMeta:
    """What ``torch.nn.attention.varlen.varlen_attn`` takes for a paged pool."""

    cu_seq_q: torch.Tensor  # (B + 1,) int32
    seqused_k: torch.Tensor  # (B,) int32
    block_table: torch.Tensor  # (B, tiles) int32
    max_q: int
    max_k: int
    rows: int  # real query rows (the flattened batch's padding comes after them)


def build_meta(
    spans: list[tuple[int, int, list[int], int]],
    block_size: int,
    group: int,
    device: torch.device,
    use_varlen: bool = False,
    kernel: str = "tiled",
) -> AttnMeta:
    """``spans``: per sequence (first flattened row, query rows, block table, kv length)."""
    if kernel == "sdpa" and not use_varlen:
        return _sdpa_meta(spans, block_size, device)
    qmax = max(q for _, q, _, _ in spans)
    while group * qmax % ROW_GROUP:
        qmax += 1
    tiles = max(-(-kv // block_size) for _, _, _, kv in spans)
    gather, tables, limits, src, dst = [], [], [], [], []
    for b, (start, q, blocks, kv) in enumerate(spans):
        n = -(-kv // block_size)
        gather.append([start + min(i, q - 1) for i in range(qmax)])
        tables.append(blocks[:n] + [SCRATCH] * (tiles - n))
        # query i sits at position kv - q + i and sees keys up to it (pads: as the last row)
        limits.append([kv - q + min(i, q - 1) for i in range(qmax)])
        src += range(b * qmax, b * qmax + q)
        dst += range(start, start + q)
    keys = torch.arange(tiles * block_size, device=device).view(tiles, 1, block_size)
    lim = torch.tensor(limits, device=device)  # (B, qmax)
    blocked = keys[None] > lim[:, None, :, None]  # (B, tiles, qmax, tile)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    varlen = None
    if use_varlen:
        cu = [0]
        for _, q, _, _ in spans:
            cu.append(cu[-1] + q)
        as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        varlen = VarlenMeta(
            cu_seq_q=as_int(cu),
            seqused_k=as_int([kv for _, _, _, kv in spans]),
            block_table=as_int(tables),
            max_q=max(q for _, q, _, _ in spans),
            max_k=max(kv for _, _, _, kv in spans),
            rows=cu[-1],
        )
    return AttnMeta(
        gather=as_long(gather),
        tables=as_long(tables),
        blocked=blocked[:, None, :, None],
        scatter_from=as_long(src),
        scatter_to=as_long(dst),
        varlen=varlen,
    )


def _sdpa_meta(spans: list[tuple[int, int, list[int], int]], block_size: int, device: torch.device) -> AttnMeta:
    seqs = []
    for start, q, blocks, kv in spans:
        n = -(-kv // block_size)
        used = blocks[:n]
        run = used == list(range(used[0], used[0] + n))
        blocks = (used[0], n) if run else torch.tensor(used, device=device)
        mask = None
        if q > 1:
            rows = torch.arange(kv - q, kv, device=device)
            mask = torch.arange(kv, device=device)[None, :] <= rows[:, None]
        seqs.append(SeqView(start, q, kv, blocks, mask))
    empty = torch.empty(0, dtype=torch.long, device=device)
    return AttnMeta(empty, empty, empty, empty, empty, seqs=seqs)


def _sdpa(q: torch.Tensor, scale: float, pool: BlockPool, layer: int, seqs: list[SeqView], out: torch.Tensor) -> None:
    k_pool, v_pool = pool.k[layer], pool.v[layer]
    for s in seqs:
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(
            qs,
            pool.heads(k_pool, s.blocks, s.kv_len)[None],
            pool.heads(v_pool, s.blocks, s.kv_len)[None],
            attn_mask=s.mask,
            scale=scale,
            enable_gqa=True,
        )
        out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1).flatten(1)


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The flash kernel runs on CUDA in half precision only."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _tile_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 2 (tiles) as a tree of adjacent pairs over a power-of-two count.

    Trailing all-zero tiles (another chunking, another batch's padding) leave the result
    exactly as it was: the tree over 2n tiles is the tree over the first n plus zero.
    ``sum`` instead orders its additions by the length, so its bits depend on it.
    """
    n = x.shape[2]
    size = 1 << (n - 1).bit_length()
    if size != n:
        pad = list(x.shape)
        pad[2] = size - n
        x = torch.cat([x, x.new_zeros(pad)], 2)
    while x.shape[2] > 1:
        half = x.shape[2] // 2
        shape = (*x.shape[:2], half, 2, *x.shape[3:])
        x = x.view(shape).sum(3)
    return x[:, :, 0]


def paged_attention(
    q: torch.Tensor, scale: float, pool: BlockPool, layer: int, meta: AttnMeta, out: torch.Tensor
) -> None:
    """``q``: (T, heads, dim) queries, scaled by ``scale`` here (inside the fused kernels: no op
    of its own); writes (T, heads * dim) into ``out``."""
    if meta.varlen is not None:
        _varlen(q, scale, pool, layer, meta.varlen, out)
        return
    if meta.seqs is not None:
        _sdpa(q, scale, pool, layer, meta.seqs, out)
        return
    heads, dim = q.shape[1], q.shape[2]
    kvh = pool.kv_heads
    g = heads // kvh
    bsz, qmax = meta.gather.shape
    tiles = meta.tables.shape[1]
    tile = pool.block_size
    qs = (q.index_select(0, meta.gather.flatten()) * scale).view(bsz, qmax, kvh, g, dim)
    qs = qs.permute(0, 2, 3, 1, 4).reshape(bsz, kvh, 1, g * qmax, dim)
    shape = (bsz, tiles, tile, kvh, dim)
    index = meta.tables.flatten()
    k = _tiles(pool, pool.k[layer], index).view(shape).permute(0, 3, 1, 4, 2)  # (B, kvh, tiles, dim, tile)
    # Values with a column of ones: one product gives each tile's weighted rows and its
    # softmax sum, so both are summed over tiles in the same order (a separate sum of a
    # narrow tensor was reduced in another order for another tile count).
    v = torch.empty(bsz, kvh, tiles, tile, dim + 1, dtype=q.dtype, device=q.device)
    v[..., dim] = 1.0
    v[..., :dim] = _tiles(pool, pool.v[layer], index).view(shape).permute(0, 3, 1, 2, 4)
    s = torch.matmul(qs, k).view(bsz, kvh, tiles, g, qmax, tile).masked_fill_(meta.blocked, float("-inf"))
    tmax = s.amax(-1, keepdim=True)
    p = torch.exp(s - tmax.clamp(min=torch.finfo(s.dtype).min))
    pv = torch.matmul(p.view(bsz, kvh, tiles, g * qmax, tile), v).view(bsz, kvh, tiles, g, qmax, dim + 1)
    w = torch.exp(tmax - tmax.amax(2, keepdim=True))
    acc = _tile_sum(pv * w)  # (B, kvh, g, qmax, dim + 1)
    o = acc[..., :dim] / acc[..., dim:]
    o = o.permute(0, 3, 1, 2, 4).reshape(bsz * qmax, heads * dim)
    out.index_copy_(0, meta.scatter_to, o.index_select(0, meta.scatter_from))


def _tiles(pool: BlockPool, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The blocks ``index`` of a layer's tensor as (N, block_size, kv_heads, dim)."""
    if pool.paged:
        return t.index_select(0, index)
    return t.index_select(1, index).permute(1, 2, 0, 3)


def _varlen(q: torch.Tensor, scale: float, pool: BlockPool, layer: int, m: VarlenMeta, out: torch.Tensor) -> None:
    """CUDA: the paged flash kernel reads the blocks in place (no gather). ``num_splits=1``
    keeps a sequence's result independent of the rest of the batch (its documented
    batch-invariance switch); ``window_size=(-1, 0)`` is causal, aligned bottom-right."""
    from torch.nn.attention.varlen import varlen_attn

    o = varlen_attn(
        q[: m.rows],
        pool.k[layer],
        pool.v[layer],
        m.cu_seq_q,
        None,
        m.max_q,
        m.max_k,
        scale=scale,
        window_size=(-1, 0),
        enable_gqa=True,
        seqused_k=m.seqused_k,
        block_table=m.block_table,
        num_splits=1,
    )
    out[: m.rows] = o.flatten(1)
