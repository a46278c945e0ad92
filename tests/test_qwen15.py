"""The third model (Qwen2.5-Coder-1.5B, the opt-in ``qwen15`` extra) in every path of the
engine: each exact path gives the tokens of a cold computation, and a streamed gate answer
says whether it was verified. Skipped unless the model is installed; ~7 GB in float32, so
the one test loads it once and frees it after."""

from __future__ import annotations

from collections.abc import Callable

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from headstart.session.template import ChatTemplate
from tests.helpers import cold, converse

SHORT = SamplingParams(max_tokens=4)
QUESTIONS = ["What is 2 + 3? Answer with a number.", "And 4 + 4?"]


def test_qwen15_every_path_equals_cold_or_says_it_was_a_gate_answer(
    qwen15: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    assert qwen15.info.architecture == "qwen2" and qwen15.model.config.num_hidden_layers == 28
    assert ChatTemplate(qwen15.tokenizer).supports_tools
    engine = make_engine(qwen15, gap_threshold=0.0, continuation_cap=4, forced_cap=2)
    # Not streamed: exact whatever the gate's threshold (cold, then entry or ready_exact).
    outs, prompts = converse(engine, "q15", QUESTIONS, params=SHORT)
    assert outs[0].path == "cold" and outs[1].path in ("entry", "ready_exact")
    # session: an edit of the first question keeps only what the two prompts share
    edited = [{"role": "user", "content": "What is 7 + 1? Answer with a number."}]
    redo = engine.generate(Request(messages=edited, params=SHORT, session_id="q15"))
    assert redo.path == "session" and redo.cached_tokens > 0
    for c, prompt in [*zip(outs, prompts, strict=True), (redo, edited)]:
        assert c.token_ids == cold(engine, prompt, params=SHORT).token_ids
    # Streamed, threshold 0: the gate answers and the completion says whether it was right.
    assert engine.wait_idle(600)
    nxt = [*edited, {"role": "assistant", "content": redo.text}, {"role": "user", "content": "And 5 + 5?"}]
    gated = engine.generate(Request(messages=nxt, params=SHORT, session_id="q15", stream=True))
    reference = cold(engine, nxt, params=SHORT)
    if gated.path == "gate":
        assert gated.verified == (gated.token_ids[:1] == reference.token_ids[:1])
    else:
        assert gated.path == "ready_exact" and gated.token_ids == reference.token_ids
