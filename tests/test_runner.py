"""The own forward: transformers is the oracle; batching and chunking change no bit."""

from __future__ import annotations

import pytest
import torch

from headstart.kv import KVSeq
from headstart.model import HFBackend
from headstart.model.runner import Feed, Runner, from_backend
from headstart.session.template import ChatTemplate

MODELS = ["real", "qwen"]
_runners: dict[str, Runner] = {}


def _runner(which: str, request: pytest.FixtureRequest) -> tuple[HFBackend, Runner]:
    backend: HFBackend = request.getfixturevalue(which)
    if which not in _runners:  # one runner per model for the whole module (weights are shared)
        _runners[which] = from_backend(backend, kv_budget=8192 * backend.info.kv_bytes_per_token,
                                       kernel="tiled", linear="mkl")  # chunk-invariant, transformers' bits
    return backend, _runners[which]


def _prompt(backend: HFBackend, text: str = "Tell me three facts about the sea, and why it is salty.") -> list[int]:
    return ChatTemplate(backend.tokenizer).render([{"role": "user", "content": text}])


@pytest.mark.parametrize("which", MODELS)
def test_logits_match_transformers(which: str, request: pytest.FixtureRequest) -> None:
    backend, runner = _runner(which, request)
    ids = _prompt(backend)
    state = backend.new_state()
    want = backend.forward(state, ids, keep=len(ids))
    seq = KVSeq(runner.pool)
    got = runner.forward([Feed(seq, ids, keep=len(ids))])[0]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    for token in [int(want[-1].argmax()), 13, 42]:  # decode steps on the kept KV
        want = backend.forward(state, [token])
        got = runner.forward([Feed(seq, [token])])[0]
        assert (got - want).abs().max().item() < 1e-4
    seq.release()


@pytest.mark.parametrize("which", MODELS)
def test_a_sequence_alone_equals_it_among_others(which: str, request: pytest.FixtureRequest) -> None:
    backend, runner = _runner(which, request)
    ids = _prompt(backend)
    others = [_prompt(backend, t) for t in ("Hi.", "Write a long poem about the moon and its phases, please.", "2+2?")]
    alone = KVSeq(runner.pool)
    prefill_alone = runner.forward([Feed(alone, ids, keep=3)])[0]
    decode_alone = runner.forward([Feed(alone, [7])])[0]
    seqs = [KVSeq(runner.pool) for _ in range(4)]
    batch = runner.forward([Feed(seqs[0], others[0]), Feed(seqs[1], ids, keep=3), Feed(seqs[2], others[1], keep=2),
                            Feed(seqs[3], others[2])])
    assert torch.equal(batch[1], prefill_alone)
    # decoding beside a sequence that is still prefilling, and beside other decodes
    mixed = runner.forward([Feed(seqs[0], [5]), Feed(seqs[1], [7]), Feed(seqs[3], others[0])])
    assert torch.equal(mixed[1], decode_alone)
    for s in [alone, *seqs]:
        s.release()


@pytest.mark.parametrize("which", MODELS)
def test_chunked_prefill_is_bitwise_the_whole_prefill(which: str, request: pytest.FixtureRequest) -> None:
    backend, runner = _runner(which, request)
    ids = _prompt(backend, "Explain, step by step and with an example, how a hash table resolves collisions: "
                           "chaining, open addressing, linear and quadratic probing, and when to resize it.")
    ids = ids + ids[1:40]  # a longer prompt whose length is no multiple of 16
    assert len(ids) > 64 and len(ids) % 16 != 0
    whole = KVSeq(runner.pool)
    want = runner.forward([Feed(whole, ids)])[0]
    after = runner.forward([Feed(whole, [11])])[0]
    for chunk in (16, 64):
        seq = KVSeq(runner.pool)
        for start in range(0, len(ids), chunk):
            got = runner.forward([Feed(seq, ids[start : start + chunk])])[0]
        assert torch.equal(got, want), chunk
        assert torch.equal(runner.forward([Feed(seq, [11])])[0], after), chunk  # its KV rows too
        seq.release()
    whole.release()


def test_a_fork_decodes_as_the_original_and_copy_on_write_keeps_it(real: HFBackend,
                                                                   request: pytest.FixtureRequest) -> None:
    _, runner = _runner("real", request)
    ids = _prompt(real)
    seq = KVSeq(runner.pool)
    runner.forward([Feed(seq, ids)])
    fork = seq.fork()
    a = runner.forward([Feed(seq, [9])])[0]  # copies the shared partial block
    b = runner.forward([Feed(fork, [9])])[0]
    assert torch.equal(a, b) and seq.blocks[-1] != fork.blocks[-1]
    seq.crop(len(ids))
    seq.adopt(fork)
    assert torch.equal(runner.forward([Feed(seq, [4])])[0], runner.forward([Feed(KVSeq(runner.pool), [*ids, 9, 4])])[0])
    seq.release()


@pytest.mark.parametrize("which", MODELS)
def test_the_default_mode_matches_transformers_and_is_batch_invariant(
    which: str, request: pytest.FixtureRequest
) -> None:
    """sdpa, the default: a sequence's prefill and decode logits are the same bits alone and
    in one forward with three other sequences of other lengths (prefilling or decoding)."""
    backend: HFBackend = request.getfixturevalue(which)
    fast = from_backend(backend, kv_budget=4096 * backend.info.kv_bytes_per_token)
    assert fast.kernel == "sdpa" and fast.linear == "onednn"
    ids = _prompt(backend)
    want = backend.forward(backend.new_state(), ids)
    alone = KVSeq(fast.pool)
    prefill_alone = fast.forward([Feed(alone, ids, keep=3)])[0]
    assert (prefill_alone[-1:] - want).abs().max().item() < 1e-4
    decode_alone = fast.forward([Feed(alone, [7])])[0]
    assert (decode_alone - backend.forward(backend.new_state(), [*ids, 7])).abs().max().item() < 1e-4
    others = [_prompt(backend, t) for t in ("Hi.", "Write a long poem about the moon and its phases, please.", "2+2?")]
    seqs = [KVSeq(fast.pool) for _ in range(4)]
    batch = fast.forward([Feed(seqs[0], others[0]), Feed(seqs[1], ids, keep=3), Feed(seqs[2], others[1]),
                          Feed(seqs[3], others[2], keep=2)])
    assert torch.equal(batch[1], prefill_alone)
    mixed = fast.forward([Feed(seqs[0], [5]), Feed(seqs[1], [7]), Feed(seqs[2], [9]), Feed(seqs[3], others[0])])
    assert torch.equal(mixed[1], decode_alone)
    for s in [alone, *seqs]:
        s.release()


@pytest.mark.parametrize("shape", ["wqkv", "w2"])
def test_fp16_rows_get_the_same_bits_in_a_product_of_any_size(shape: str, real: HFBackend) -> None:
    """fbgemm's fp16 kernel gives the rows of a last group of one or two rows other bits;
    ``pad_rows`` pads every product past that, so a row's bits never depend on the row count."""
    from headstart.model.llama import Linear, pad_rows

    weights = from_backend(real, kv_budget=64 * real.info.kv_bytes_per_token, linear="fp16").model.layers[3]
    lin: Linear = getattr(weights, shape)
    lin.pack("fp16")
    x = torch.randn(600, lin.w.shape[1], generator=torch.Generator().manual_seed(0))
    full = lin(x, "fp16")
    for rows in [*range(1, 80), 127, 128, 129, 255, 256, 257]:
        padded = rows + pad_rows("fp16", rows)
        assert torch.equal(lin(x[:padded], "fp16")[:rows], full[:rows]), rows


@pytest.mark.parametrize("which", MODELS)
def test_fp16_weights_are_batch_invariant_and_close_to_fp32(which: str, request: pytest.FixtureRequest) -> None:
    """The opt-in weight-only half precision: a sequence's logits are the same bits alone and
    among others, and within rounding of the fp32 weights' (transformers)."""
    backend: HFBackend = request.getfixturevalue(which)
    half = from_backend(backend, kv_budget=4096 * backend.info.kv_bytes_per_token, linear="fp16")
    assert half.linear == "fp16"
    ids = _prompt(backend)
    state = backend.new_state()
    want = backend.forward(state, ids, keep=len(ids))
    alone = KVSeq(half.pool)
    prefill_alone = half.forward([Feed(alone, ids, keep=len(ids))])[0]
    assert (prefill_alone - want).abs().max().item() < 0.25
    tokens, hf_tokens = [], []
    got, want = prefill_alone[-1:], want[-1:]
    for _ in range(8):  # greedy decode on each side's own KV
        tokens.append(int(got[-1].argmax()))
        hf_tokens.append(int(want[-1].argmax()))
        got = half.forward([Feed(alone, [tokens[-1]])])[0]
        want = backend.forward(state, [hf_tokens[-1]])
    assert tokens == hf_tokens
    decode_alone = got
    others = [_prompt(backend, t) for t in ("Hi.", "Write a long poem about the moon and its phases, please.", "2+2?")]
    seqs = [KVSeq(half.pool) for _ in range(4)]
    half.forward([Feed(seqs[1], ids)])
    for t in tokens[:-1]:
        half.forward([Feed(seqs[1], [t])])
    batch = half.forward([Feed(seqs[0], others[0]), Feed(seqs[1], [tokens[-1]]), Feed(seqs[2], others[1], keep=2),
                          Feed(seqs[3], others[2])])
    assert torch.equal(batch[1], decode_alone)
    prefill_among = half.forward([Feed(seqs[0], [5]), Feed(seqs[2], [9]), Feed(seqs[3], ids, keep=len(ids))])
    single = KVSeq(half.pool)  # the same chunks, alone
    half.forward([Feed(single, others[2])])
    assert torch.equal(prefill_among[2], half.forward([Feed(single, ids, keep=len(ids))])[0])
    for s in [alone, single, *seqs]:
        s.release()
