"""The transformers backend: any causal LM transformers can load, on CPU or CUDA.

KV lives in a ``DynamicCache``; we touch its per-layer ``keys``/``values`` directly to
copy and re-attach suffixes, which is cheaper than cloning whole caches for every
speculation.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from headstart.model.backend import ModelInfo
from headstart.model.loader import ModelSource, local_folder, pick_device, resolve

log = logging.getLogger("headstart.model")


# Special tokens that end a text in the model families headstart loads. A GGUF keeps a
# single eos id (Qwen2.5's keeps <|im_end|>), while the model's original generation config
# stops on <|endoftext|> too; a model that writes one must not run on past it.
END_OF_TEXT = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")


def end_of_text_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens among :data:`END_OF_TEXT`."""
    return {
        int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content in END_OF_TEXT
    }


class HFState:
    """A ``DynamicCache`` and its length (the cache's own count is per layer)."""

    def __init__(self, cache: DynamicCache) -> None:
        self.cache = cache
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2
            for layer in self.cache.layers
            if layer.is_initialized and layer.keys is not None
        )


@dataclass
class HFSuffix:
    """Detached rows ``start..start+length`` of every layer."""

    start: int
    length: int
    rows: list[tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.rows)


class HFBackend:
    """A transformers causal LM behind the :class:`~headstart.model.backend.Backend` contract."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        config = model.config
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype = next(model.parameters()).dtype
        per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
        self._layers = text.num_hidden_layers
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        eos_ids |= end_of_text_ids(tokenizer)
        self.info = ModelInfo(
            name=name,
            architecture=config.model_type,
            vocab_size=model.get_output_embeddings().weight.shape[0],
            context_length=int(getattr(text, "max_position_embeddings", 2048)),
            device=str(self.device),
            dtype=str(dtype).removeprefix("torch."),
            eos_token_ids=tuple(sorted(eos_ids)),
            kv_bytes_per_token=per_token,
        )

    def new_state(self) -> HFState:
        return HFState(DynamicCache(config=self.model.config))

    @torch.inference_mode()
    def forward(self, state: HFState, token_ids: list[int], keep: int = 1) -> torch.Tensor:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        keep = min(keep, len(token_ids))
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=state.cache, use_cache=True, logits_to_keep=keep)
        state.length += len(token_ids)
        return out.logits[0, -keep:, :].float()

    def crop(self, state: HFState, length: int) -> None:
        if length < 0 or length > state.length:
            raise ValueError(f"cannot crop a state of {state.length} to {length}")
        if length < state.length:
            state.cache.crop(length - state.length)
            state.length = length
            # DynamicCache crops by slicing, and a slice pins its whole buffer: copy what is
            # kept so the dropped rows' memory is freed now (the KV budget counts real bytes).
            for layer in state.cache.layers:
                if layer.is_initialized and layer.keys is not None:
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()

    def suffix(self, state: HFState, start: int) -> HFSuffix:
        rows = [
            (layer.keys[..., start:, :].clone(), layer.values[..., start:, :].clone())
            for layer in state.cache.layers
        ] if state.length > start else []
        return HFSuffix(start, state.length - start, rows)

    def save_state(self, state: HFState, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
        """Write ``state`` to a safetensors file (atomically: a crash leaves no half file)."""
        tensors: dict[str, torch.Tensor] = {}
        for i, (keys, values) in enumerate(self.suffix(state, 0).rows):
            tensors[f"k{i}"], tensors[f"v{i}"] = keys.contiguous().cpu(), values.contiguous().cpu()
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={**metadata, "length": str(state.length)})
        os.replace(tmp, path)

    def load_state(self, path: str | os.PathLike[str]) -> tuple[HFState, dict[str, str]]:
        """Read back a state written by :meth:`save_state`, with its metadata."""
        with safe_open(str(path), framework="pt", device=str(self.device)) as f:
            metadata = dict(f.metadata() or {})
            rows = [(f.get_tensor(f"k{i}"), f.get_tensor(f"v{i}")) for i in range(self._layers)]
        length = int(metadata.pop("length"))
        state = self.new_state()
        if length:
            self.extend(state, HFSuffix(0, length, rows))
        return state, metadata

    def extend(self, state: HFState, suffix: HFSuffix) -> None:
        if suffix.start != state.length:
            raise ValueError(f"suffix starts at {suffix.start}, state has {state.length}")
        for layer, (keys, values) in zip(state.cache.layers, suffix.rows, strict=True):
            layer.update(keys, values)
        state.length += suffix.length


def load(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> HFBackend:
    """Load ``spec`` (short name, GGUF or HF folder) offline onto ``device``."""
    source: ModelSource = resolve(spec, cache_dir)
    folder = local_folder(source, cache_dir)
    target = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    if target.type == "cuda":
        # Exactness tests compare incremental and full computations: no TF32 shortcuts.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(target)
    backend = HFBackend(model, tokenizer, source.name)
    # Weights are memory-mapped: page them in (and let kernels initialise) now, not on a
    # user's first request.
    backend.forward(backend.new_state(), list(range(1, 17)))
    log.info("loaded %s on %s in %.1f s", source.name, target, time.perf_counter() - started)
    return backend
