"""What spilling an evicted session's KV saves, side by side on this machine.

``python -m headstart.bench.spill --tokens 2048 --rounds 3`` prefills a one-message session of
about that many tokens on the engine (what rebuilding an evicted session costs), writes its KV
to a spill folder as eviction does, and reads it back into its blocks as the next request's
reload does; each round on a fresh session, so a slow spell of a shared machine hits all three
alike. It prints the medians and the ratio of recomputing to spilling (write plus read). The
README's figure for ``--spill auto`` comes from this command.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model name, .gguf or HF folder (default: the default model)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the session's KV (about)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from headstart.decode.sampling import SamplingParams
    from headstart.engine.engine import Engine, EngineConfig, Request
    from headstart.kv.spill import Spill
    from headstart.model import load

    engine = Engine(load(args.model), config=EngineConfig(pre_position=False, gate=False, spill=False)).start()
    words = " ".join(f"item{i}" for i in range(args.tokens))  # about two tokens a word: cut to size below
    tokenizer = engine.template.tokenizer
    text = tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][: args.tokens - 16])
    prefill, write, read = [], [], []
    try:
        with tempfile.TemporaryDirectory() as folder:
            spill = Spill(folder, engine.pool, 1 << 40)
            for r in range(args.rounds):
                sid = f"spill-{r}"
                t0 = time.perf_counter()
                engine.generate(Request(messages=[{"role": "user", "content": text}],
                                        params=SamplingParams(max_tokens=1), session_id=sid))
                prefill.append(time.perf_counter() - t0)
                assert engine.wait_idle(600)
                s = engine.get_session(sid)
                kept = engine.pool.read(s.kv.blocks, len(s.kv))
                t0 = time.perf_counter()
                spill.save(sid, s.kv)
                write.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                taken = spill.take(sid)
                assert taken is not None and taken[0] == s.kv_ids
                engine.pool.write(s.kv.blocks, taken[1])
                read.append(time.perf_counter() - t0)
                back = engine.pool.read(s.kv.blocks, len(s.kv))
                assert all(torch.equal(a, b) for pair, again in zip(kept, back, strict=True)
                           for a, b in zip(pair, again, strict=True)), "the reloaded KV differs"
                tokens = len(s.kv_ids)
    finally:
        engine.stop()
    p50 = {name: statistics.median(xs) for name, xs in (("prefill", prefill), ("write", write), ("read", read))}
    print(f"{engine.backend.info.name}, {tokens} tokens of KV, medians of {args.rounds} rounds: "
          f"recompute (prefill) {p50['prefill']:.3f} s, spill write {p50['write']:.3f} s, read back "
          f"{p50['read']:.3f} s; recompute / (write + read) = {p50['prefill'] / (p50['write'] + p50['read']):.0f}x")


if __name__ == "__main__":
    main()
