"""What constrained decoding costs: ms per token with and without a JSON schema, side by side.

``python -m headstart.bench.grammar [--model M] [--rounds R] [--tokens N] [--threads T]``

Runs the same greedy request, unconstrained and under a JSON schema, alternately for
``--rounds`` rounds on one in-process engine, and reports the decode time per token of each
(from the first token to the last, so the prefill is left out) and their ratio. It then times
headstart's own choice of one token over random logits (decode/logits.py's ``Chooser.choose``:
the grammar's mask filled and unpacked, applied, the argmax, the grammar moved past it), with
no rule, under the JSON schema and, with a model whose template writes tool calls
(``--model qwen2.5-coder-0.5b``), under the tool-call grammars of two strict functions:
``required`` (calls only) and strict ``auto`` (free text with a trigger); the choosers take
their steps in turn, so each figure sees the same load. Last, the grammar engines' mask alone
(fill, apply, accept) on the same vocabulary and schema: xgrammar, which headstart uses, and
llguidance when installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from headstart.decode.sampling import Constraint, SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"]},
    },
    "required": ["name", "age", "role", "address"],
}
MESSAGES = [{"role": "user", "content": "Invent a user of a web site, with their address, as JSON."}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add_user", "parameters": SCHEMA}},
]


def decode_ms_per_token(engine: Engine, params: SamplingParams) -> float:
    handle = engine.submit(Request(MESSAGES, params))
    first = None
    for _item in handle:
        first = first or time.perf_counter()
    c = handle.completion
    assert c is not None and first is not None
    return (time.perf_counter() - first) * 1000 / max(1, c.completion_tokens - 1)


def mask_ms(fill, apply, accept, done, vocab: int, steps: int = 64) -> float:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=gen)
        t0 = time.perf_counter()
        fill()
        apply(logits)
        token = int(logits.argmax())
        accept(token)
        times.append(time.perf_counter() - t0)
        if done():
            break
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    from headstart.model import load

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load(args.model)
    engine = Engine(backend, config=EngineConfig(pre_position=False)).start()
    schema = Constraint("json_schema", json.dumps(SCHEMA))
    plain_p = SamplingParams(max_tokens=args.tokens)
    json_p = SamplingParams(max_tokens=args.tokens, constraint=schema)
    decode_ms_per_token(engine, json_p)  # compile the grammar and warm up, unmeasured
    plain, constrained = [], []
    for _ in range(args.rounds):
        plain.append(decode_ms_per_token(engine, plain_p))
        constrained.append(decode_ms_per_token(engine, json_p))
    engine.stop()
    a, b = statistics.median(plain), statistics.median(constrained)
    print(f"{backend.info.name}: decode {a:.1f} ms/token unconstrained, {b:.1f} ms/token with the JSON schema "
          f"(ratio {b / a:.3f}; medians of {args.rounds} alternating rounds)")
    tokenizer, vocab = engine.template.tokenizer, backend.info.vocab_size
    rules_per_token(engine, vocab)
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    x = mask_ms(lambda: matcher.fill_next_token_bitmask(bitmask), lambda lg: xgr.apply_token_bitmask_inplace(
        lg, bitmask), matcher.accept_token, matcher.is_terminated, vocab)
    print(f"xgrammar alone: mask {x:.3f} ms/token (median), tokenizer and schema compiled in {compile_s:.1f} s")
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt
    except ImportError:
        print("llguidance: not installed")
        return
    t0 = time.perf_counter()
    lm = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab),
                              llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    bm = lt.allocate_token_bitmask(1, vocab)
    g = mask_ms(lambda: lt.fill_next_token_bitmask(lm, bm, 0), lambda lg: lt.apply_token_bitmask_inplace(lg, bm),
                lm.consume_token, lm.is_stopped, vocab)
    print(f"llguidance alone: mask {g:.3f} ms/token (median), tokenizer and schema compiled in {compile_s:.1f} s")


def rules_per_token(engine: Engine, vocab: int, steps: int = 64) -> None:
    """headstart's choice of a token (Chooser.choose) with no rule and under each grammar,
    the choosers stepping in turn over the same random logits; a grammar that terminates
    (its stop token chosen) starts again, so every figure is the median of ``steps``."""
    from headstart.decode.grammar import Grammars
    from headstart.decode.logits import Chooser
    from headstart.session.tools import plan_tools

    stop = {*engine.backend.info.eos_token_ids, engine.template.end_of_message}
    grammars = Grammars(engine.template.tokenizer, vocab, stop)
    constraints: dict[str, Constraint | None] = {"no rule": None,
                                                 "JSON schema": Constraint("json_schema", json.dumps(SCHEMA))}
    if engine.template.supports_tools:
        for choice in ("required", "auto"):
            plan = plan_tools(engine.template, TOOLS, choice, strict={"get_weather", "add_user"})
            constraints[f"tool calls, {choice} (2 strict functions)"] = plan.constraint
    compile_s = {}
    for name, constraint in constraints.items():
        if constraint is not None:
            t0 = time.perf_counter()
            grammars.compile(constraint)
            compile_s[name] = time.perf_counter() - t0
    device = engine.backend.info.device  # where the model's logits are

    def chooser(constraint: Constraint | None) -> Chooser:
        params = SamplingParams(constraint=constraint)
        return Chooser(params, [], vocab, device, None, grammars.matcher(constraint) if constraint else None)

    choosers = {name: chooser(c) for name, c in constraints.items()}
    times: dict[str, list[float]] = {name: [] for name in constraints}
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        logits = torch.randn(vocab, generator=gen).to(device)
        for name, c in choosers.items():
            t0 = time.perf_counter()
            c.choose(logits)
            times[name].append(time.perf_counter() - t0)
            if c.matcher is not None and c.matcher.terminated:  # type: ignore[attr-defined]
                choosers[name] = chooser(constraints[name])
    for name, ts in times.items():
        compiled = f", compiled in {compile_s[name]:.2f} s" if name in compile_s else ""
        print(f"headstart, {name}: {statistics.median(ts) * 1000:.3f} ms/token to choose (median of {steps}){compiled}")


if __name__ == "__main__":
    main()
