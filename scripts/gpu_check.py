"""The GPU check, one script: exactness on CUDA, TTFT per path, decode and batched decode.

    make gpu-check            # or: python scripts/gpu_check.py [--dtype bfloat16] [--block 256]

Runs on the default model and on a randomly initialised 7B-class llama (weights cannot
travel to a lent GPU machine; latency does not depend on their values), in under five
minutes on one H200. It prints one table per part and exits non-zero when an exactness
check fails. Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from headstart.bench.model_only import format_table, run_model_only
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.kv import KVSeq
from headstart.model import HFBackend, load
from headstart.model.runner import Feed, Runner, from_backend
from headstart.session.template import ChatTemplate

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "And what is the capital of Germany?",
    "Name one famous river in that country.",
]
GREEDY = SamplingParams(max_tokens=16)


def random_7b(tokenizer_from: HFBackend, dtype: torch.dtype) -> HFBackend:
    """A llama-2-7B-shaped model with random weights, built on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer_from.tokenizer),
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = 2
    return HFBackend(model, tokenizer_from.tokenizer, "random-llama-7b")


def invariance(backend: HFBackend, runner: Runner) -> list[str]:
    """Bitwise: alone == in a batch of four; chunks of 16 and 64 == all at once."""
    problems = []
    t = ChatTemplate(backend.tokenizer)
    ids = t.render([{"role": "user", "content": "Explain how a hash table resolves collisions, with an example."}])
    others = [t.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = KVSeq(runner.pool)
    want = runner.forward([Feed(alone, ids)])[0]
    seqs = [KVSeq(runner.pool) for _ in range(4)]
    got = runner.forward([Feed(seqs[0], others[0]), Feed(seqs[1], ids), Feed(seqs[2], others[1]),
                          Feed(seqs[3], others[2])])[1]
    if not torch.equal(got, want):
        problems.append(f"batch of 4 differs from alone: max |diff| {(got - want).abs().max().item():.3g}")
    for chunk in (16, 64):
        seq = KVSeq(runner.pool)
        for start in range(0, len(ids), chunk):
            out = runner.forward([Feed(seq, ids[start : start + chunk])])[0]
        if not torch.equal(out, want):
            problems.append(f"chunks of {chunk} differ: max |diff| {(out - want).abs().max().item():.3g}")
        seq.release()
    for s in [alone, *seqs]:
        s.release()
    return problems


def engine_checks(backend: HFBackend, block: int) -> tuple[list[str], dict[str, float]]:
    """Greedy session turns == cold, and TTFT per path (cold, session, ready_exact, gate)."""
    problems: list[str] = []
    ttft: dict[str, list[float]] = {}
    engine = Engine(backend, config=EngineConfig(kv_block=block, gap_threshold=0.0)).start()
    try:
        messages: list[dict[str, str]] = []
        for q in QUESTIONS:
            messages.append({"role": "user", "content": q})
            c = engine.generate(Request(messages=list(messages), params=GREEDY, session_id="gpu", gate=False))
            ref = engine.generate(Request(messages=list(messages), params=GREEDY))
            if c.token_ids != ref.token_ids:
                problems.append(f"turn {len(messages) // 2 + 1} ({c.path}) differs from cold")
            ttft.setdefault(c.path, []).append(c.ttft_ms)
            ttft.setdefault("cold", []).append(ref.ttft_ms)
            messages.append({"role": "assistant", "content": c.text})
            engine.wait_idle(120)
        s = engine.get_session("gpu")
        s.settings.hint = "Thanks."
        engine.schedule_pre_position(s)
        engine.wait_idle(120)
        hinted = [*messages, {"role": "user", "content": "Thanks."}]
        c = engine.generate(Request(messages=hinted, params=GREEDY, session_id="gpu", gate=False, ephemeral=True))
        ttft.setdefault(c.path, []).append(c.ttft_ms)
        if c.token_ids != engine.generate(Request(messages=hinted, params=GREEDY)).token_ids:
            problems.append(f"{c.path} differs from cold")
        g = engine.generate(Request(messages=[*messages, {"role": "user", "content": "Ok."}], params=GREEDY,
                                    session_id="gpu"))
        ttft.setdefault(g.path, []).append(g.ttft_ms)
    finally:
        engine.stop()
    return problems, {k: sorted(v)[len(v) // 2] for k, v in ttft.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--block", type=int, default=256, help="KV block size (the paged flash kernel's page)")
    p.add_argument("--skip-7b", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    print(f"# GPU check on {torch.cuda.get_device_name()} ({args.dtype}, block {args.block})")
    backend = load(device="cuda", dtype=args.dtype)
    runner = from_backend(backend, kv_budget=4 << 30, block_size=args.block)
    problems = [f"default model: {x}" for x in invariance(backend, runner)]
    engine_problems, ttft = engine_checks(backend, args.block)
    problems += [f"default model engine: {x}" for x in engine_problems]
    print("\n| path | TTFT ms (median) |\n| --- | --- |")
    for path, ms in ttft.items():
        print(f"| {path} | {ms:.2f} |")
    print()
    print(format_table(run_model_only(backend, [128, 512, 2048], [1, 2, 4, 8], reps=10, progress=False,
                                      block_size=args.block)))
    if not args.skip_7b:
        del runner
        big = random_7b(backend, dtype)
        big_runner = from_backend(big, kv_budget=16 << 30, block_size=args.block)
        problems += [f"random 7b: {x}" for x in invariance(big, big_runner)]
        del big_runner
        print()
        print(format_table(run_model_only(big, [128, 512, 2048], [1, 2, 4, 8], reps=10, progress=False,
                                          block_size=args.block)))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    for x in problems:
        print(f"FAILED: {x}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
