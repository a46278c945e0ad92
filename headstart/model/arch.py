"""The shape of a llama-family network, read from its config.json (or a transformers config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Architectures the own forward runs; any other goes to the transformers backend.
SUPPORTED = ("llama", "qwen2")


@dataclass(frozen=True)
class ArchConfig:
    arch: str
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    rms_eps: float
    max_pos: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> ArchConfig:
        arch = c["model_type"]
        if arch not in SUPPORTED:
            raise ValueError(f"the own forward runs {SUPPORTED}, not {arch!r}")
        heads = c["num_attention_heads"]
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE scaling {kind!r} is not implemented by the own forward")
        return cls(
            arch=arch,
            dim=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn=c["intermediate_size"],
            vocab=c["vocab_size"],
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            rms_eps=float(c["rms_norm_eps"]),
            max_pos=int(c.get("max_position_embeddings", 2048)),
            tied=bool(c.get("tie_word_embeddings", False)),
            # qwen2 has biases on q/k/v; llama may (attention_bias), off by default.
            qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        )
