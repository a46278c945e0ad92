"""llama.cpp's model layer beside ``headstart bench --model-only``, on the same GGUF.

The same figures as the transformers backend and the runner: decode ms/token at each
context, prefill tokens/s, and aggregate decode tokens/s of B sequences in one
``llama_decode`` (a ``llama_batch`` whose tokens carry B sequence ids, one KV stream per
sequence), with the same token ids, positions and thread count. It runs in a child
process of the peer's interpreter (``--peer-python``), which need not have headstart:
this file is run there by path, so below the parent's part it uses only llama-cpp-python's
low-level API and the standard library.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LABEL = "llama.cpp"


def measure(python: str, gguf: Path, ids: list[int], contexts: list[int], batches: list[int], reps: int,
            prefill_tokens: int, threads: int) -> dict[str, Any]:
    """Run the measurement in ``python``; its figures, keyed as ``run_model_only``'s."""
    spec = {"gguf": str(gguf), "ids": ids, "contexts": contexts, "batches": batches, "reps": reps,
            "prefill_tokens": prefill_tokens, "threads": threads}
    done = subprocess.run([python, __file__], input=json.dumps(spec), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the llama.cpp measurement failed (exit {done.returncode}): {tail}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {"version": got["version"], "decode_ms": {int(k): v for k, v in got["decode_ms"].items()},
            "prefill_tok_s": got["prefill_tok_s"],
            "batched_decode_tok_s": {int(k): v for k, v in got["batched_decode_tok_s"].items()}}


def add_to(result: dict[str, Any], peer: dict[str, Any] | None, why: str, threads: int) -> dict[str, Any]:
    """``result`` with llama.cpp's figures as one more column of each table, or the reason it has none."""
    if peer is None:
        result["llama_cpp"] = why
        return result
    result["llama_cpp"] = (f"llama-cpp-python {peer['version']} on the same GGUF, {threads} threads, "
                           "low-level API in a child process")
    result["decode_ms"][LABEL] = peer["decode_ms"]
    result["prefill_tok_s"][LABEL] = peer["prefill_tok_s"]
    result["batched_decode_tok_s"][LABEL] = peer["batched_decode_tok_s"]
    return result


def run(args: Any, result: dict[str, Any], ids: list[int], contexts: list[int], batches: list[int],
        prefill_tokens: int) -> dict[str, Any]:
    """``headstart bench --model-only``'s llama.cpp part: measured when ``--peer-python`` has
    llama-cpp-python and the model is a GGUF, otherwise skipped with the reason."""
    import torch

    from headstart.bench import peer_llamacpp
    from headstart.model.loader import resolve

    threads = torch.get_num_threads()
    reason = peer_llamacpp.unavailable(args.peer_python)
    source = resolve(args.model, args.cache_dir)
    if reason is None and not source.is_gguf:
        reason = "the model is not a GGUF file"
    if reason is not None:
        return add_to(result, None, f"skipped: {reason}. To run it: {peer_llamacpp.INSTALL_HINT}", threads)
    print("model-only: llama.cpp (child process)...", file=sys.stderr)
    peer = measure(args.peer_python, source.path / str(source.gguf_file), ids, contexts, batches, args.reps,
                   prefill_tokens, threads)
    return add_to(result, peer, "", threads)


# The child: only llama-cpp-python and the standard library from here on.


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp as L

    ids, reps, threads = spec["ids"], spec["reps"], spec["threads"]
    contexts, batches = spec["contexts"], spec["batches"]
    L.llama_backend_init()
    model = L.llama_model_load_from_file(spec["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
    n_batch = 512
    batch = L.llama_batch_init(n_batch, 0, 1)

    def context(n_seq: int, n_ctx_seq: int) -> Any:
        p = L.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.kv_unified = n_seq * n_ctx_seq, n_seq, False  # one KV stream per sequence
        p.n_batch = p.n_ubatch = n_batch
        p.n_threads = p.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, p)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def decode(ctx: Any, rows: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) rows, finished."""
        batch.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if (rc := L.llama_decode(ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        L.llama_synchronize(ctx)

    def prefill(ctx: Any, tokens: list[int], seq: int = 0) -> None:
        """``tokens`` from position 0, in ``n_batch`` chunks, logits of the last row only."""
        for start in range(0, len(tokens), n_batch):
            part = tokens[start : start + n_batch]
            decode(ctx, [(t, start + j, seq, start + j == len(tokens) - 1) for j, t in enumerate(part)])

    def clear(ctx: Any) -> None:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    one = context(1, max(contexts) + reps + 16)
    prefill(one, ids[:8])  # a first forward outside the timed parts, as a loaded server has had
    clear(one)
    decode_ms = {}
    for c in contexts:
        prefill(one, ids[:c])
        decode_ms[c] = _median_ms(lambda k, c=c: decode(one, [(ids[c], c + k, 0, True)]), reps)
        clear(one)
    prompt = ids[: spec["prefill_tokens"]]

    def timed_prefill(_: int) -> None:
        prefill(one, prompt)
        clear(one)

    prefill_ms = _median_ms(timed_prefill, 2)
    L.llama_free(one)
    c = min(contexts)
    many = context(max(batches), c + reps + 16)
    batched = {}
    for b in batches:
        for s in range(b):
            prefill(many, ids[s : s + c], seq=s)
        ms = _median_ms(lambda k, b=b: decode(many, [(ids[c], c + k, s, True) for s in range(b)]), reps)
        batched[b] = b * 1000 / ms
        clear(many)
    L.llama_free(many)
    L.llama_batch_free(batch)
    L.llama_model_free(model)
    return {"version": L.__version__, "decode_ms": decode_ms, "prefill_tok_s": len(prompt) * 1000 / prefill_ms,
            "batched_decode_tok_s": batched}


def _median_ms(fn: Any, n: int) -> float:
    """Median ms of ``fn(k)`` for k in 0..n-1 (k: the repetition, for positions that move on)."""
    times = []
    for k in range(n):
        t = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    print(json.dumps(_child(json.load(sys.stdin))))
