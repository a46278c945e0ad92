"""The own forward of the llama family (llama, qwen2) over the paged KV pool.

Per layer: one fused q/k/v projection, RoPE from tables built once (transformers'
``rotate_half`` convention, since the cache holds HF-layout weights), the new K/V rows
written straight into their pool slots, paged attention, then one fused gate/up
projection. Logits are computed only for the rows a caller asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headstart.kv.pool import BlockPool
from headstart.model.arch import ArchConfig
from headstart.model.attention import AttnMeta, paged_attention
from headstart.model.weights import LayerWeights, Weights

# Kernels for the linear layers. "onednn": oneDNN with weights packed once (CPU, fp32), whose
# rows never depend on how many rows the product has; "mkl": F.linear (MKL sgemm on the CPU,
# cuBLAS on CUDA), transformers' own kernel, whose rows do (see Linear).
LINEARS = ("onednn", "mkl")


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    """``x @ w.T + b`` through F.linear, or through oneDNN once :meth:`pack` has run.

    Why oneDNN on the CPU: MKL's sgemm computes rows in groups of four and gives a row of a
    1-3-row product, or of a last partial group, other bits than the same row in a bigger
    product, and at 2-8 rows it costs 2-5x its one-row time (measured on this 2-core EPYC).
    oneDNN's packed product gives a row the same bits for any row count (measured for 1-600
    rows on both models' shapes; tests/test_runner.py) and costs about 1.5-2x from 1 to 8
    rows, which is what batched decode needs. Its sums run in another order than MKL's, so its
    logits differ from transformers' in the last bits (up to ~1.6e-4 on logits of ~30 after 30
    layers). The packed copy is a second copy of the weights (the transformers module keeps
    its own, the oracle's).
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        self.w, self.b = w, b
        self.packed: torch.Tensor | None = None

    def pack(self) -> None:
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, None)

    def __call__(self, x: torch.Tensor, onednn: bool) -> torch.Tensor:
        if onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)


class _Layer:
    def __init__(self, lw: LayerWeights) -> None:
        self.attn_norm, self.mlp_norm = lw.attn_norm, lw.mlp_norm
        self.wqkv, self.wo = Linear(lw.wqkv, lw.bqkv), Linear(lw.wo)
        self.w13, self.w2 = Linear(lw.w13), Linear(lw.w2)


def rope_tables(arch: ArchConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin per position: ``x*cos + roll(x, half)*sin`` is HF's
    ``x*cos + rotate_half(x)*sin``."""
    half = arch.head_dim // 2
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim))
    freqs = torch.arange(arch.max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return emb.cos().to(device), sin.to(device)


class Llama:
    """Weights and tables of one model; :meth:`forward` runs a flattened batch."""

    def __init__(self, arch: ArchConfig, weights: Weights) -> None:
        self.arch = arch
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.layers = [_Layer(lw) for lw in weights.layers]
        self.head = Linear(weights.head)
        cos, sin = rope_tables(arch, self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        h, kvh, d = arch.heads, arch.kv_heads, arch.head_dim
        self._split = ((h + kvh) * d, kvh * d)
        self.scale = d**-0.5

    def pack(self) -> bool:
        """Pack every weight for oneDNN (once); False where oneDNN does not run."""
        if not onednn_usable(self.device, self.dtype):
            return False
        for lin in [self.head, *(x for lw in self.layers for x in (lw.wqkv, lw.wo, lw.w13, lw.w2))]:
            lin.pack()
        return True

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        meta: AttnMeta,
        rows: torch.Tensor,
        pool: BlockPool,
        onednn: bool = False,
    ) -> torch.Tensor:
        """``ids``/``positions``/``slots``: (T,) over every sequence; returns fp32 logits of
        the flattened rows ``rows``. ``onednn``: the linear layers through oneDNN (after
        :meth:`pack`)."""
        a, w = self.arch, self.w
        t = ids.shape[0]
        h, kvh, d = a.heads, a.kv_heads, a.head_dim
        half = d // 2
        x = F.embedding(ids, w.embed)
        cos = self.cos.index_select(0, positions)[:, None]
        sin = self.sin.index_select(0, positions)[:, None]
        attn = torch.zeros(t, h * d, dtype=x.dtype, device=x.device)
        for layer, lw in enumerate(self.layers):
            qkv = lw.wqkv(F.rms_norm(x, (a.dim,), lw.attn_norm, a.rms_eps), onednn)
            qk, v = qkv.split(self._split, -1)
            qk = qk.view(t, h + kvh, d)
            qk = qk * cos + qk.roll(half, -1) * sin
            pool.put(layer, slots, qk[:, h:], v.view(t, kvh, d))
            paged_attention(qk[:, :h] * self.scale, pool, layer, meta, attn)
            x = x + lw.wo(attn, onednn)
            gate, up = lw.w13(F.rms_norm(x, (a.dim,), lw.mlp_norm, a.rms_eps), onednn).chunk(2, -1)
            x = x + lw.w2(F.silu(gate) * up, onednn)
        out = F.rms_norm(x.index_select(0, rows), (a.dim,), w.norm, a.rms_eps)
        return self.head(out, onednn).float()
