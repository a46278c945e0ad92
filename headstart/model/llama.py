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
from headstart.model.weights import Weights


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
        cos, sin = rope_tables(arch, self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        h, kvh, d = arch.heads, arch.kv_heads, arch.head_dim
        self._split = ((h + kvh) * d, kvh * d)
        self.scale = d**-0.5

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        meta: AttnMeta,
        rows: torch.Tensor,
        pool: BlockPool,
    ) -> torch.Tensor:
        """``ids``/``positions``/``slots``: (T,) over every sequence; returns fp32 logits of
        the flattened rows ``rows``."""
        a, w = self.arch, self.w
        t = ids.shape[0]
        h, kvh, d = a.heads, a.kv_heads, a.head_dim
        half = d // 2
        x = F.embedding(ids, w.embed)
        cos = self.cos.index_select(0, positions)[:, None]
        sin = self.sin.index_select(0, positions)[:, None]
        attn = torch.zeros(t, h * d, dtype=x.dtype, device=x.device)
        for layer, lw in enumerate(w.layers):
            hn = F.rms_norm(x, (a.dim,), lw.attn_norm, a.rms_eps)
            qkv = F.linear(hn, lw.wqkv, lw.bqkv)
            qk, v = qkv.split(self._split, -1)
            qk = qk.view(t, h + kvh, d)
            qk = qk * cos + qk.roll(half, -1) * sin
            pool.k[layer].view(-1, kvh, d).index_copy_(0, slots, qk[:, h:])
            pool.v[layer].view(-1, kvh, d).index_copy_(0, slots, v.view(t, kvh, d))
            paged_attention(qk[:, :h] * self.scale, pool, layer, meta, attn)
            x = x + F.linear(attn, lw.wo)
            gate, up = F.linear(F.rms_norm(x, (a.dim,), lw.mlp_norm, a.rms_eps), lw.w13).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, lw.w2)
        out = F.rms_norm(x.index_select(0, rows), (a.dim,), w.norm, a.rms_eps)
        return F.linear(out, w.head).float()
