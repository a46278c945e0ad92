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

# Kernels for the linear layers (see Linear): "onednn" and "mkl" on the fp32 weights, "fp16" on
# a half-precision copy of them.
LINEARS = ("onednn", "mkl", "fp16")
MKL_ROWS = 4  # MKL's sgemm computes rows in groups of this many
FP16_ROWS = 6  # fbgemm's fp16 kernel computes rows in groups of this many


def linear_usable(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """``mkl`` runs everywhere (it is F.linear); the packed kernels need the CPU and fp32."""
    if kind == "mkl":
        return True
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if kind == "onednn":
        return torch.backends.mkldnn.is_available()
    return "fbgemm" in torch.backends.quantized.supported_engines


def pad_rows(kind: str, rows: int) -> int:
    """Rows to add to a ``rows``-row product so that each row gets the bits it gets in a product
    of any other size (measured for 1-600 rows on both models' shapes; tests/test_runner.py):
    MKL gives a last group of 1-3 rows other bits; fbgemm's fp16 kernel gives a last group of
    1 or 2 rows other bits (3-5 get the bits of a full group)."""
    if kind == "mkl":
        return -rows % MKL_ROWS
    if kind == "fp16" and rows % FP16_ROWS in (1, 2):
        return 3 - rows % FP16_ROWS
    return 0


class Linear:
    """``x @ w.T + b`` through one of three kernels; the packed ones after :meth:`pack`.

    - ``onednn`` (the CPU default): oneDNN with the fp32 weights packed once. Why: MKL's sgemm
      gives a row of a 1-3-row product other bits than the same row in a bigger product, and
      at 2-8 rows it costs 2-5x its one-row time (measured on this 2-core EPYC); oneDNN gives a
      row the same bits for any row count and costs about 1.5-2x from 1 to 8 rows, which is
      what batched decode needs. Its sums run in another order than MKL's, so its logits
      differ from transformers' in the last bits (up to ~1.6e-4 on logits of ~30 after 30
      layers). The packed copy is a second copy of the weights (the transformers module keeps
      its own, the oracle's).
    - ``mkl``: F.linear, transformers' own kernel and bits (cuBLAS on CUDA); products are
      padded to whole row groups (:func:`pad_rows`).
    - ``fp16``: weight-only half precision, fbgemm's fp16 GEMM (fp32 activations and sums, the
      weights rounded to fp16 once). A decoded token is bound by the bytes of weights it reads,
      so this halves them: about 2x faster per linear layer at one row. The rounding moves
      logits by ~1e-2 from fp32's, so it is opt-in; every exact path stays exact against a cold
      computation in the same mode.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        self.w, self.b = w, b
        self.packed: dict[str, torch.Tensor] = {}

    def pack(self, kind: str) -> None:
        if kind == "mkl" or kind in self.packed:
            return
        if kind == "onednn":
            self.packed[kind] = torch.ops.mkldnn._reorder_linear_weight(self.w, None)
        else:
            self.packed[kind] = torch.ops.quantized.linear_prepack_fp16(self.w, self.b)

    def __call__(self, x: torch.Tensor, kind: str, add: torch.Tensor | None = None) -> torch.Tensor:
        """The product, plus ``add`` when given: oneDNN adds it in the same call (a residual
        connection costs no op of its own; the same bits as adding after)."""
        if kind == "onednn":
            if add is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed[kind], self.b, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[kind], self.b, "none", [], "")
        if kind == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed[kind])
        else:
            y = F.linear(x, self.w, self.b)
        return y if add is None else y + add


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

    def pack(self, kind: str) -> str:
        """Pack every weight for the linear kernel ``kind`` (once per kind); returns the kernel
        that runs: ``mkl`` where oneDNN does not (CUDA, half precision)."""
        if kind not in LINEARS:
            raise ValueError(f"linear must be one of {LINEARS}")
        if not linear_usable(kind, self.device, self.dtype):
            if kind == "fp16":
                raise ValueError("linear='fp16' (weight-only half precision) runs on the CPU with fp32 weights; "
                                 "on CUDA load the model in half precision instead (--dtype float16)")
            return "mkl"
        for lin in [self.head, *(x for lw in self.layers for x in (lw.wqkv, lw.wo, lw.w13, lw.w2))]:
            lin.pack(kind)
        return kind

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        meta: AttnMeta,
        rows: torch.Tensor,
        pool: BlockPool,
        linear: str = "mkl",
    ) -> torch.Tensor:
        """``ids``/``positions``/``slots``: (T,) over every sequence; returns fp32 logits of
        the flattened rows ``rows``. ``linear``: the linear layers' kernel (packed by
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
            qkv = lw.wqkv(F.rms_norm(x, (a.dim,), lw.attn_norm, a.rms_eps), linear)
            qk, v = qkv.split(self._split, -1)
            qk = qk.view(t, h + kvh, d)
            qk = qk * cos + qk.roll(half, -1) * sin
            pool.put(layer, slots, qk[:, h:], v.view(t, kvh, d))
            paged_attention(qk[:, :h], self.scale, pool, layer, meta, attn)
            x = lw.wo(attn, linear, add=x)
            gate, up = lw.w13(F.rms_norm(x, (a.dim,), lw.mlp_norm, a.rms_eps), linear).chunk(2, -1)
            x = lw.w2(F.silu(gate) * up, linear, add=x)
        out = F.rms_norm(x.index_select(0, rows), (a.dim,), w.norm, a.rms_eps)
        return self.head(out, linear).float()
