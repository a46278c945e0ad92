"""The critical path: times from arrival, door work off the event loop, cached renders that
equal full ones, incremental detokenisation, prompt final chunks, and honest counters."""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from headstart.decode.sampling import SamplingParams
from headstart.decode.textstream import TextStream
from headstart.engine import engine as engine_mod
from headstart.engine import sessions as sessionapi
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.engine.output import Completion, Delta
from headstart.errors import ContextTooLong
from headstart.model import HFBackend
from headstart.model.loader import local_folder, resolve
from headstart.server import errors
from headstart.session.store import SessionStore
from headstart.session.template import ChatTemplate, RenderCache, common_prefix
from tests.apiutil import Blocker, serve, settle, wait_until
from tests.conftest import require_qwen
from tests.helpers import GREEDY, QUESTIONS, cold, converse, hint_next

# -- tokenizers of both models (no weights needed) ---------------------------------------


def _tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    if name is not None:
        name = require_qwen()
    return AutoTokenizer.from_pretrained(local_folder(resolve(name)))


@pytest.fixture(scope="module", params=[None, "qwen"], ids=["smollm2", "qwen"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return _tokenizer(request.param)


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                           "parameters": {"type": "object",
                                                          "properties": {"word": {"type": "string"}}}}}]


def _turns(tools: bool) -> list[dict[str, Any]]:
    """A conversation with every role, unicode that tokenises into byte pieces, and text
    that spells the template's own special tokens."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "猫"}'}}
    turns: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse. 🙂"},
        {"role": "user", "content": "What does 猫 mean? Answer with one word."},
        {"role": "assistant", "content": "Cat 🐈."},
        {"role": "user", "content": "And <|im_start|> inside text, or <|im_end|>?"},
        {"role": "assistant", "content": " leading space and trailing \n"},
    ]
    if tools:
        turns += [
            {"role": "user", "content": "Look up 犬."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"meaning": "dog 🐕"}'},
            {"role": "assistant", "content": "It means dog."},
        ]
    else:
        turns += [{"role": "tool", "content": "a tool result 🐕"}, {"role": "assistant", "content": "Noted."}]
    return [*turns, {"role": "user", "content": "Thanks! 谢谢"}]


def test_cached_render_equals_the_full_render(tokenizer: PreTrainedTokenizerBase) -> None:
    """Turn by turn as a session renders (its requests, the next entry, a predicted prompt,
    an edited history), the cached rendering gives exactly the full rendering's ids."""
    template = ChatTemplate(tokenizer)
    tools = TOOLS if template.supports_tools else None
    turns = _turns(template.supports_tools)
    encoded: list[int] = []
    encode = template.encode_chat

    def spy(text: str) -> list[int]:
        encoded.append(len(text))
        return encode(text)

    template.encode_chat = spy  # type: ignore[method-assign]
    cache = RenderCache()
    for n in range(1, len(turns) + 1):
        messages = turns[:n]
        full = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
        encoded.clear()
        assert template.render(messages, tools=tools, cache=cache) == full, f"request render differs at {n}"
        if n > 1:  # the cache was used: less than the whole text was tokenised
            assert sum(encoded) < len(template.render_text(messages, tools=tools))
        for role in ("user", "tool", "assistant"):
            cached = template.entry(messages, role, tools=tools, cache=cache)
            assert cached == template.entry(messages, role, tools=tools)
        predicted = [*messages, {"role": "user", "content": ""}]
        assert template.render(predicted, tools=tools, cache=cache) == template.render(predicted, tools=tools)
        assert template.render(messages, generation_prompt=False, tools=tools, cache=cache) == template.render(
            messages, generation_prompt=False, tools=tools
        )
    # An edited earlier message (a client rewriting history) must not reuse the old tokens past
    # it, even when the edit keeps every later message opening at the same offset.
    for i, old, new in ((1, "猫", "犬"), (2, "Cat 🐈", "Dog 🐕")):
        edited = [dict(m) for m in turns]
        edited[i]["content"] = edited[i]["content"].replace(old, new)
        assert len(template.render_text(edited, tools=tools)) == len(template.render_text(turns, tools=tools))
        template.render(turns, tools=tools, cache=cache)
        assert template.render(edited, tools=tools, cache=cache) == template.render(edited, tools=tools)


def test_a_recent_render_is_reused_only_for_the_same_inputs(tokenizer: PreTrainedTokenizerBase) -> None:
    """The same conversation again (fresh objects, as a door parses it) gets a recent
    rendering's ids without the template running; inputs Python calls equal but the template
    writes apart (1, 1.0 and True; a dict's order) are rendered, each exactly; a template
    that reads the clock is run every time."""
    template = ChatTemplate(tokenizer)
    calls: list[int] = []
    render_text = template.render_text

    def spy(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        return render_text(*args, **kwargs)

    template.render_text = spy  # type: ignore[method-assign]
    tools = TOOLS if template.supports_tools else None
    turns = _turns(template.supports_tools)
    cache = RenderCache()
    first = template.render(turns, tools=tools, cache=cache)
    calls.clear()
    assert template.render(copy.deepcopy(turns), tools=tools, cache=cache) == first and not calls
    assert template.render(turns, generation_prompt=False, tools=tools, cache=cache) == template.render(
        turns, generation_prompt=False, tools=tools)
    if template.supports_tools:
        lookalikes = [{"word": 1, "exact": True}, {"exact": True, "word": 1}, {"word": True, "exact": 1},
                      {"word": 1.0, "exact": True}]
        assert all(a == lookalikes[0] for a in lookalikes)
        texts = set()
        for arguments in lookalikes:
            call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
            messages = [*turns, {"role": "assistant", "content": "", "tool_calls": [call]}]
            texts.add(render_text(messages, tools=tools))
            assert template.render(messages, tools=tools, cache=cache) == template.render(messages, tools=tools)
        assert len(texts) == len(lookalikes)  # each renders differently: a reused one would be wrong
    clocked = _tokenizer(None if not template.supports_tools else "qwen")
    clocked.chat_template = "{{ strftime_now('%H:%M:%S.%f') }}" + clocked.chat_template
    template = ChatTemplate(clocked)
    calls.clear()
    render_text = template.render_text
    template.render_text = spy  # type: ignore[method-assign]
    for _ in range(2):
        template.render(turns, tools=tools, cache=cache)
    assert len(calls) == 2


def test_cached_render_tokenises_only_the_new_part(tokenizer: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate(tokenizer)
    seen: list[int] = []
    encode = template.encode_chat

    def spy(text: str) -> list[int]:
        seen.append(len(text))
        return encode(text)

    template.encode_chat = spy  # type: ignore[method-assign]
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "reply " * 400}]
    cache = RenderCache()
    template.render(long, cache=cache)
    seen.clear()
    nxt = [*long, {"role": "user", "content": "short"}]
    assert template.render(nxt, cache=cache) == encode(template.render_text(nxt))
    assert seen and max(seen) < len(template.render_text(nxt)) // 4


def test_entry_is_rendered_once_per_context(tokenizer: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate(tokenizer)
    calls = []
    render_text = template.render_text

    def spy(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        return render_text(*args, **kwargs)

    template.render_text = spy  # type: ignore[method-assign]
    cache = RenderCache()
    messages = _turns(False)[:3]
    first = template.entry(messages, "user", cache=cache)
    assert len(calls) == 2
    for _ in range(4):
        assert template.entry(messages, "user", cache=cache) == first
    assert len(calls) == 2
    template.entry([*messages, {"role": "user", "content": "x"}], "user", cache=cache)
    assert len(calls) == 4  # another context renders again


def test_encode_chat_equals_the_tokenizer_call(tokenizer: PreTrainedTokenizerBase) -> None:
    """encode_chat asks a fast tokenizer's backend directly: the ids are the tokenizer call's
    on whole renderings and their pieces, and a backend set to truncate is not asked."""
    template = ChatTemplate(tokenizer)
    tools = TOOLS if template.supports_tools else None
    text = template.render_text(_turns(template.supports_tools), tools=tools)
    pieces = [text, text[len(text) // 3:], text[-40:], " leading", "<|im_start|>user\n", "🐈‍⬛ 中文 한국어", ""]
    for piece in pieces:
        assert template.encode_chat(piece) == list(tokenizer(piece, add_special_tokens=False)["input_ids"])
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=3)
    try:
        # The call turns truncation off before it encodes, so the ids are whole; the backend would cut them.
        assert len(template.encode_chat(text)) > 3
    finally:
        backend.no_truncation()


def test_common_prefix_equals_a_plain_scan() -> None:
    import random

    rng = random.Random(7)
    for _ in range(500):
        n = rng.randrange(0, 300)
        a = [rng.randrange(4) for _ in range(n)]
        b = a[: rng.randrange(0, n + 1)] + [rng.randrange(4) for _ in range(rng.randrange(0, 50))]
        expect = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == common_prefix(tuple(b), a) == expect


@pytest.mark.parametrize("body", [b'{"a": "\\ud800"}', b'{"a": ["x", "\\uDFFF"]}', b'{"a": "\xed\xa0\x80"}',
                                  '{"a": "\\ud800"}'.encode("utf-16-le"),
                                  '{"a": "\ud800"}'.encode("utf-16-le", "surrogatepass")],
                         ids=["escape", "escape-upper", "utf8-bytes", "utf16-escape", "utf16-bytes"])
def test_a_body_that_spells_a_surrogate_is_refused(body: bytes) -> None:
    """parse_json skips re-encoding a body that cannot spell a surrogate: every way one can is still refused."""
    with pytest.raises(errors.HTTPError) as refused:
        errors.parse_json(body)
    assert refused.value.status == 400 and refused.value.code == "invalid_json"


def test_a_body_without_surrogates_parses() -> None:
    body = '{"a": "\\\\ud800 is text", "b": "\\ud83d\\ude00", "c": "😀 中文"}'.encode()
    assert errors.parse_json(body) == {"a": "\\ud800 is text", "b": "😀", "c": "😀 中文"}


# -- incremental detokenisation ------------------------------------------------------------

TEXTS = [
    "Hello, world! Plain ASCII with  double spaces.",
    "Emoji: 🐈‍⬛ 👩🏽‍💻 🇫🇷 and 🙂🙃 next to each other.",
    "中文文本：你好，世界！日本語のテキスト、한국어 텍스트.",
    "Mixed: naïve café — “quotes” … 1/2 ½ ∑ ∫ and 🧪 test\nnew line\ttab",
]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "emoji", "cjk", "mixed"])
def test_incremental_decode_equals_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    windows: list[int] = []
    decode = tokenizer.decode

    class Spy:
        def decode(self, part: list[int], **kw: Any) -> str:
            windows.append(len(part))
            return decode(part, **kw)

    stream = TextStream(Spy())  # type: ignore[arg-type]
    out = ""
    for i, token in enumerate(ids):
        out += stream.push(token)
        full = decode(ids[: i + 1], skip_special_tokens=True)
        assert full.startswith(out)  # never text that must be taken back
        assert "\ufffd" not in out
    out += stream.finish()
    assert out == decode(ids, skip_special_tokens=True) == stream.text
    assert max(windows) <= 8, "each token is decoded with a few neighbours, not the whole answer"


@pytest.mark.parametrize("stop", ["世界", "🙃", "next to"])
def test_stop_strings_across_token_boundaries(tokenizer: PreTrainedTokenizerBase, stop: str) -> None:
    text = TEXTS[1] + " " + TEXTS[2]
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    stream = TextStream(tokenizer, (stop,))
    out = ""
    for token in ids:
        out += stream.push(token)
        if stream.stopped:
            break
    out += stream.finish()
    assert stream.stopped and out == text[: text.find(stop)]


# -- counters and small fixes ---------------------------------------------------------------


def test_forwards_before_first_token_counts_only_this_request(
    tiny: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    # A step budget that holds every prompt whole: a cold request's own forwards before its
    # first token are then exactly its one prefill, however many others share those steps.
    engine = make_engine(tiny, gap_threshold=0.0, step_tokens=4096)
    first = [{"role": "user", "content": QUESTIONS[0]}]
    c = engine.generate(Request(messages=first, params=GREEDY, session_id="g"))
    assert engine.wait_idle(120) and "next" in engine.get_session("g").ready
    nxt = [*first, {"role": "assistant", "content": c.text}, {"role": "user", "content": QUESTIONS[1]}]
    with Blocker(engine):  # queue two cold requests of other sessions ahead of the gate hit
        others = [engine.submit(Request(messages=[{"role": "user", "content": q}], params=GREEDY,
                                        session_id=f"other{i}")) for i, q in enumerate(QUESTIONS[2:4])]
        gated = engine.submit(Request(messages=nxt, params=GREEDY, session_id="g", stream=True))
        cold = engine.submit(Request(messages=[{"role": "user", "content": QUESTIONS[4]}], params=GREEDY))
    done = [h.result() for h in [*others, gated, cold]]
    assert done[2].path == "gate" and done[2].extra["forwards_before_first_token"] == 0
    assert done[3].path == "cold" and done[3].extra["forwards_before_first_token"] == 1
    assert engine.stats.forward_calls > 4  # the others' forwards ran in between, and were not counted


def test_a_first_token_that_needs_no_forward_is_chosen_by_the_submitting_thread(
    tiny: HFBackend, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no step under way and no request in flight, the submitting thread runs the step's
    first part: a ready_exact hit's first token is chosen there before ``submit`` returns,
    and the forwards of the rest stay on the model thread. With the step held elsewhere, a
    request only queues."""
    engine = make_engine(tiny, gate=False)
    outs, prompts = converse(engine, "door", QUESTIONS[:1])
    hint_next(engine, "door", QUESTIONS[1])
    messages = [*prompts[0], {"role": "assistant", "content": outs[0].text}, {"role": "user", "content": QUESTIONS[1]}]
    chosen: list[threading.Thread] = []
    forwards: list[threading.Thread] = []
    first, run = engine_mod._Emitter._first, engine.book.run

    def noted_first(self: Any) -> None:
        chosen.append(threading.current_thread())
        first(self)

    def noted_run(pieces: Any) -> Any:
        forwards.append(threading.current_thread())
        return run(pieces)

    monkeypatch.setattr(engine_mod._Emitter, "_first", noted_first)
    monkeypatch.setattr(engine.book, "run", noted_run)
    ask = Request(messages=messages, params=GREEDY, session_id="door", ephemeral=True)
    handle = engine.submit(ask)
    assert chosen == [threading.current_thread()]  # before submit returned, on this thread
    c = handle.result()
    assert c.path == "ready_exact" and c.completion_tokens > 1
    assert forwards and set(forwards) == {engine.scheduler._thread}
    assert engine.wait_idle(120)
    with Blocker(engine):
        held = engine.submit(ask)
        time.sleep(0.1)
        assert len(chosen) == 1  # queued behind the held step: nothing chosen yet
    assert held.result().token_ids == c.token_ids == cold(engine, messages).token_ids
    assert chosen[1] is engine.scheduler._thread


def test_evicted_clears_once_the_kv_is_rebuilt(tiny: HFBackend, tmp_path: Path) -> None:
    config = EngineConfig(pre_position=False, spill=False)
    db = tmp_path / "h.db"
    engine = Engine(tiny, config=config, store=SessionStore(db)).start()
    short = SamplingParams(max_tokens=6)
    first = [{"role": "user", "content": QUESTIONS[0]}]
    try:
        engine.generate(Request(messages=first, params=short, session_id="a"))
        a = engine.get_session("a")
        again = [*a.messages, {"role": "user", "content": QUESTIONS[1]}]
        pool = engine.pool

        def reserve(messages: list) -> int:  # what a turn reserves: whole blocks (engine.submit)
            tokens = len(engine.template.render(messages)) + short.max_tokens + engine.config.forced_cap
            return pool.blocks_for(tokens) * pool.block_bytes

        # Room for a's second turn, but not for b's turn beside a's first.
        engine.budget.limit = reserve(again)
        assert a.kv_bytes() + reserve(first) > engine.budget.limit
        engine.generate(Request(messages=first, params=short, session_id="b"))
        assert engine.get_session("a").describe()["evicted"]
        assert engine.generate(Request(messages=again, params=short, session_id="a")).path == "cold"
        assert not engine.get_session("a").describe()["evicted"]
        assert engine.get_session("b").describe()["evicted"]  # b made room for a's turn
    finally:
        engine.stop()
    restarted = Engine(tiny, config=config, store=SessionStore(db)).start()  # the default budget
    try:
        a = restarted.get_session("a")
        assert a.describe()["evicted"]  # nothing of its KV survived the restart
        again = [*a.messages, {"role": "user", "content": QUESTIONS[2]}]
        restarted.generate(Request(messages=again, params=short, session_id="a"))
        assert not restarted.get_session("a").describe()["evicted"]
    finally:
        restarted.stop()


def test_max_context_applies_to_warms_and_registered_questions(tiny: HFBackend) -> None:
    limit = 64
    engine = Engine(tiny, config=EngineConfig(max_context=limit)).start()
    try:
        s = sessionapi.open_session(engine, "mc", None, pre_position=False)
        long = [{"role": "user", "content": "word " * 80}]
        assert limit < len(engine.template.render(long)) < tiny.info.context_length
        with pytest.raises(ContextTooLong):
            sessionapi.warm(engine, s, Request(messages=long, session_id="mc"))
        q = sessionapi.add_query(engine, s, "word " * 60, max_tokens=4)
        wait_until(lambda: q.evaluations or q.error is not None, 120)
        assert q.error is not None and f"the context holds {limit}" in q.error and q.value is None
    finally:
        engine.stop()


# -- the final chunk ------------------------------------------------------------------------


def test_final_chunk_goes_out_with_the_forward_that_ends_the_answer(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    """With another session decoding, an answer that ends with its end-of-message token is
    completed in the same step as the forward that produced that token: no other forward
    comes between (ordering on the model thread, not a timing threshold)."""
    engine = make_engine(real, pre_position=False)
    events: list[tuple[str, Any]] = []  # ("forward", the sessions in it) or ("done", a session)
    run = engine.book.run

    def logged(pieces: Any) -> Any:
        out = run(pieces)
        events.append(("forward", frozenset(need.session.id for need, _ in pieces)))
        return out

    engine.book.run = logged  # type: ignore[method-assign]
    engine.observers.append(lambda c: events.append(("done", c.session_id or "")))
    long = engine.submit(Request(messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                                 params=SamplingParams(max_tokens=120), session_id="long"))
    wait_until(lambda: any(e[0] == "forward" and "long" in e[1] for e in events))
    short = engine.submit(Request(messages=[{"role": "user", "content": QUESTIONS[0]}],
                                  params=SamplingParams(max_tokens=60), session_id="short"))
    c = short.result()
    long.result()
    assert c.finish_reason == "stop" and c.completion_tokens < 60  # ended by its end-of-message token
    ours = [i for i, e in enumerate(events) if e == ("done", "short") or (e[0] == "forward" and "short" in e[1])]
    last_forward, finished = ours[-2], ours[-1]
    assert events[finished] == ("done", "short") and events[last_forward][0] == "forward"
    assert finished == last_forward + 1, f"other steps ran between the end and the final chunk: {events}"
    # they did run concurrently: in the same forwards
    assert any(e[0] == "forward" and {"long", "short"} <= e[1] for e in events[ours[0]:finished])


# -- over HTTP: arrival, door work off the loop, writes before acknowledgement -----------------


def test_times_count_from_arrival_and_door_work_runs_off_the_loop(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The headstart object splits the time (door, queue); rendering and tokenising ran on a
    worker thread with no event loop, and the reported times include them."""
    with serve(tiny, engine={"pre_position": False}) as served:
        engine = served.engine
        renders: list[tuple[bool, float]] = []
        render = engine.template.render

        def spy(*args: Any, **kwargs: Any) -> list[int]:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            t0 = time.perf_counter()
            out = render(*args, **kwargs)
            renders.append((on_loop, (time.perf_counter() - t0) * 1000))
            return out

        engine.template.render = spy  # type: ignore[method-assign]
        parse = errors.parse_json

        def slow_parse(body: bytes) -> object:
            time.sleep(0.05)  # a slow parse: it happens after arrival, so the times include it
            return parse(body)

        monkeypatch.setattr(errors, "parse_json", slow_parse)
        client = OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0,
                        default_headers={"x-session-id": "door"})
        messages = [{"role": "user", "content": "word " * 500}]
        last = None
        model = engine.backend.info.name
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                                    stream=True):
            last = chunk
        assert last is not None
        h = last.model_extra["headstart"]
        assert renders and not any(on for on, _ in renders)
        assert h["door_ms"] >= 50 + renders[0][1]  # parsing and the render are part of the door time ...
        assert h["ttft_ms"] >= h["door_ms"] + h["queue_ms"]  # ... which is part of the reported TTFT
        r = served.client.post("/v1/sessions/door/generate", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["timing"]["door_ms"] >= 50
        assert len(renders) >= 2 and not any(on for on, _ in renders)
        settle(served)
        text = served.client.get("/metrics").text
        assert "headstart_door_seconds_count 2.0" in text and "headstart_queue_seconds_count 2.0" in text


def test_first_chunk_time_lies_between_the_token_and_the_client(tiny: HFBackend) -> None:
    """A streamed answer's first_chunk_ms is the door's: after the engine chose the first
    token (ttft_ms) and before the client read the chunk (the server's span lies inside the
    client's, on the same clock). An answer that is not streamed has none."""
    with serve(tiny, engine={"pre_position": False}) as served:
        body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 6, "temperature": 0,
                "stream": True}
        for _ in range(2):
            start, first, ext = time.perf_counter(), None, None
            with served.client.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter()
                    if '"headstart"' in line:
                        ext = json.loads(line[6:])["headstart"]
            assert first is not None and ext is not None
            assert ext["ttft_ms"] <= ext["first_chunk_ms"] <= (first - start) * 1000
        whole = served.client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert whole["headstart"]["first_chunk_ms"] is None


def test_event_loop_is_not_held_by_long_conversations(tiny: HFBackend, capsys: pytest.CaptureFixture[str]) -> None:
    """4 clients send ~2,000-token conversations while a coroutine ticks on the server's loop.
    The assertion is structural (no render on the loop thread); the lag, measured against a
    quiet baseline in the same test, is printed for the record, not asserted."""
    with serve(tiny, engine={"pre_position": False}) as served:
        engine = served.engine
        loops: list[asyncio.AbstractEventLoop] = []
        on_loop: list[bool] = []
        submit, render = engine.submit, engine.template.render

        def submit_spy(req: Request, loop: asyncio.AbstractEventLoop | None = None) -> Any:
            if loop is not None:
                loops.append(loop)
            return submit(req, loop=loop)

        def render_spy(*args: Any, **kwargs: Any) -> list[int]:
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return render(*args, **kwargs)

        engine.submit = submit_spy  # type: ignore[method-assign]
        engine.template.render = render_spy  # type: ignore[method-assign]
        served.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 1})
        loop = loops[0]

        def lag(seconds: float) -> list[float]:
            async def tick() -> list[float]:
                gaps, end = [], time.perf_counter() + seconds
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    await asyncio.sleep(0.001)
                    gaps.append((time.perf_counter() - t) * 1000 - 1.0)
                return gaps

            return asyncio.run_coroutine_threadsafe(tick(), loop).result(seconds + 30)

        quiet = lag(2.0)
        conversation = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "token " * 95}
                        for i in range(20)] + [{"role": "user", "content": "and now?"}]
        assert 1800 <= len(render(conversation)) <= 2600

        def client(i: int) -> None:
            for turn in range(2):
                r = served.client.post("/v1/chat/completions", headers={"x-session-id": f"lag{i}"},
                                       json={"messages": conversation[: 21 - turn * 2], "max_tokens": 2})
                assert r.status_code == 200, r.text

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        loaded = lag(3.0)
        for t in threads:
            t.join(300)
        assert len(on_loop) >= 9 and not any(on_loop)
        with capsys.disabled():
            print(f"\nevent-loop lag ms (quiet / 4 clients, 2,000-token conversations): "
                  f"max {max(quiet):.2f} / {max(loaded):.2f}, p99 {sorted(quiet)[int(len(quiet) * .99)]:.2f} / "
                  f"{sorted(loaded)[int(len(loaded) * .99)]:.2f}")


def test_a_turn_is_committed_before_it_is_acknowledged(tiny: HFBackend, tmp_path: Path) -> None:
    """The writer thread commits the transcript; the completion waits for that commit."""
    store = SessionStore(tmp_path / "w.db")
    engine = Engine(tiny, config=EngineConfig(pre_position=False), store=store).start()
    try:
        writer = engine.writer
        assert writer is not None
        threads: list[str] = []
        save = store.save

        def slow_save(stored: Any) -> None:
            threads.append(threading.current_thread().name)
            time.sleep(0.2)  # a slow disk: the completion must still wait for the commit
            save(stored)

        store.save = slow_save  # type: ignore[method-assign]
        hi = [{"role": "user", "content": "hi"}]
        handle = engine.submit(Request(messages=hi, params=SamplingParams(max_tokens=3), session_id="w"))
        seen: list[Any] = []
        for item in handle:
            if isinstance(item, Completion):
                with sqlite3.connect(tmp_path / "w.db") as db:  # a reader beside the server's store
                    seen.append(db.execute("SELECT turns FROM sessions WHERE id = 'w'").fetchone()[0])
            else:
                assert isinstance(item, Delta)
        assert seen == [1]
        # The session's creation is stored by the door's thread; the turn by the writer, never
        # by the model thread.
        assert threads[-1] == "headstart-writer" and "headstart-model" not in threads
    finally:
        engine.stop()
