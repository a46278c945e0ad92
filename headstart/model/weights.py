"""HF-layout weights, fused for the own forward: q/k/v into one matrix, gate/up into another.

The weights come from the transformers model loaded from the safetensors cache. Fusing
copies them once; the transformers module's own q/k/v and gate/up parameters are then
pointed at row slices of the fused tensors, so both forwards (the oracle and the fallback
on one side, the own forward on the other) read one copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headstart.model.arch import ArchConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: torch.Tensor


def _share(modules: list[torch.nn.Module], fused: torch.Tensor, attr: str = "weight") -> None:
    """Point each module's parameter at its rows of ``fused`` (a contiguous row slice)."""
    start = 0
    for m in modules:
        p = getattr(m, attr)
        rows = p.shape[0]
        p.data = fused[start : start + rows]
        start += rows


@torch.no_grad()
def from_module(model: torch.nn.Module, arch: ArchConfig) -> Weights:
    """Fused weights of a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``."""
    inner = model.model
    layers = []
    for block in inner.layers:
        att, mlp = block.self_attn, block.mlp
        qkv = [att.q_proj, att.k_proj, att.v_proj]
        wqkv = torch.cat([m.weight for m in qkv]).contiguous()
        bqkv = torch.cat([m.bias for m in qkv]).contiguous() if arch.qkv_bias else None
        w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        _share(qkv, wqkv)
        if bqkv is not None:
            _share(qkv, bqkv, "bias")
        _share([mlp.gate_proj, mlp.up_proj], w13)
        layers.append(
            LayerWeights(
                attn_norm=block.input_layernorm.weight,
                wqkv=wqkv,
                bqkv=bqkv,
                wo=att.o_proj.weight,
                mlp_norm=block.post_attention_layernorm.weight,
                w13=w13,
                w2=mlp.down_proj.weight,
            )
        )
    return Weights(
        embed=inner.embed_tokens.weight,
        layers=layers,
        norm=inner.norm.weight,
        head=model.get_output_embeddings().weight,  # the embeddings themselves when tied
    )
