"""The model layer: incremental computation equals a full prefill."""

from __future__ import annotations

import pytest
import torch

from headstart.model import HFBackend
from headstart.session.template import ChatTemplate


def _prompt(backend: HFBackend) -> list[int]:
    template = ChatTemplate(backend.tokenizer)
    return template.render([{"role": "user", "content": "Tell me a fact about the sea, briefly please."}])


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_delta_on_kept_cache_equals_full_prefill(which: str, request: pytest.FixtureRequest) -> None:
    backend: HFBackend = request.getfixturevalue(which)
    ids = _prompt(backend)
    delta = backend.tokenizer.encode(" And one about rivers, too.", add_special_tokens=False)
    full = backend.forward(backend.new_state(), ids + delta)
    kept = backend.new_state()
    backend.forward(kept, ids)
    incremental = backend.forward(kept, delta)
    assert full.shape == (1, backend.info.vocab_size)
    assert (full - incremental).abs().max().item() < 1e-4
    # extend then crop back, then the same delta again: still the same logits
    backend.forward(kept, [5, 6, 7])
    backend.crop(kept, len(ids) + len(delta) - 1)
    again = backend.forward(kept, delta[-1:])
    assert (full - again).abs().max().item() < 1e-4


def test_keep_returns_only_the_last_positions(tiny: HFBackend) -> None:
    state = tiny.new_state()
    out = tiny.forward(state, list(range(10, 30)), keep=3)
    assert out.shape == (3, tiny.info.vocab_size)
    assert len(state) == 20


def test_suffix_round_trip_is_bitwise(tiny: HFBackend) -> None:
    state = tiny.new_state()
    tiny.forward(state, list(range(100, 140)))
    suffix = tiny.suffix(state, 25)
    assert suffix.length == 15 and suffix.nbytes() == 15 * tiny.info.kv_bytes_per_token
    twin = tiny.new_state()
    tiny.forward(twin, list(range(100, 140)))
    reference = tiny.forward(twin, [7])
    tiny.crop(state, 25)
    tiny.extend(state, suffix)
    assert len(state) == 40 and state.nbytes() == 40 * tiny.info.kv_bytes_per_token
    assert torch.equal(tiny.forward(state, [7]), reference)


def test_extend_refuses_a_misplaced_suffix(tiny: HFBackend) -> None:
    state = tiny.new_state()
    tiny.forward(state, list(range(100, 120)))
    suffix = tiny.suffix(state, 10)
    with pytest.raises(ValueError):
        tiny.extend(state, suffix)
    with pytest.raises(ValueError):
        tiny.crop(state, 21)


def test_model_info(real: HFBackend) -> None:
    info = real.info
    assert info.architecture == "llama" and info.vocab_size == 49152
    assert 2 in info.eos_token_ids
    assert info.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4


def test_model_flag_accepts_a_name_a_gguf_file_or_an_hf_folder(tmp_path) -> None:
    from headstart.model.loader import local_folder, resolve

    named = resolve(None)
    assert named.name == "smollm2-135m" and named.is_gguf
    gguf = named.path / str(named.gguf_file)
    by_file = resolve(str(gguf))
    assert by_file.is_gguf and by_file.gguf_file == named.gguf_file
    folder = local_folder(named)  # the converted safetensors folder is itself an HF folder
    assert (folder / "model.safetensors").is_file()
    by_folder = resolve(str(folder))
    assert not by_folder.is_gguf and local_folder(by_folder) == folder
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        resolve(str(tmp_path / "nothing-here"))


def test_a_model_loaded_from_its_folder_matches_the_default(real: HFBackend) -> None:
    from headstart.model import load
    from headstart.model.loader import local_folder, resolve

    again = load(str(local_folder(resolve(None))))
    ids = _prompt(real)
    assert torch.equal(again.forward(again.new_state(), ids), real.forward(real.new_state(), ids))


def test_first_load_converts_the_gguf_once_into_a_cache(tmp_path, real: HFBackend) -> None:
    """The conversion a fresh machine runs: GGUF -> safetensors folder, same logits."""
    from headstart.model import load

    converted = load(cache_dir=str(tmp_path))
    folders = list((tmp_path / "converted").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    assert (folders[0] / "tokenizer.json").is_file()
    ids = _prompt(real)
    assert torch.equal(converted.forward(converted.new_state(), ids), real.forward(real.new_state(), ids))
