"""Idle-time work: move a session to its next decision point.

After a turn the session's KV ends inside the last answer. In the idle time before the
next request this job (1) prefills the entry, the tokens certain to come next whatever
the next message says; (2) predicts the next message; (3) prefills the predicted prompt
up to the point where the answer starts; and (4) keeps decoding the answer while the
model is sure of it. The result is parked as a ready position apart from the session's
own KV, which is left ending at the entry: the part any next request can reuse.
"""

from __future__ import annotations

from collections.abc import Collection, Generator
from dataclasses import dataclass

import torch

from headstart.config import BACKGROUND_CHUNK, CONTINUATION_CAP, FORCED_CAP, PREDICTOR, SURE_GAP
from headstart.session.book import KVBook, Need, NoRoom, Steps
from headstart.session.session import ReadyPosition, Session
from headstart.session.template import ChatTemplate, Message, common_prefix

PREDICTORS = ("continuation", "empty", "repeat")


@dataclass(frozen=True)
class PreposConfig:
    """Knobs of the background job; sizes are in tokens. ``threshold`` is the gate's (from
    EngineConfig), which bounds how far the sure tail is decoded."""

    predictor: str = PREDICTOR
    chunk: int = BACKGROUND_CHUNK
    continuation_cap: int = CONTINUATION_CAP
    forced_cap: int = FORCED_CAP
    threshold: float = SURE_GAP


def next_role(messages: list[Message]) -> str:
    """``tool`` after an answer that called tools, or in a loop that answered a tool result
    last time (an agent whose model writes its calls as plain text); else ``user``."""
    if messages and messages[-1].get("role") == "assistant":
        if messages[-1].get("tool_calls"):
            return "tool"
        if len(messages) >= 2 and messages[-2].get("role") == "tool":
            return "tool"
    return "user"


def predicted_prompt(
    book: KVBook, template: ChatTemplate, s: Session, role: str, config: PreposConfig,
    entry_logits: torch.Tensor, stop: Collection[int],
) -> Generator[Need | None, torch.Tensor | None, tuple[str, str]]:
    """The predicted next message: the client's hint, else the configured predictor.

    ``continuation`` lets the model write the next message itself, greedily, on the
    session's own KV after the entry (those rows are reused if the prediction is kept).
    """
    if s.settings.hint is not None:
        return s.settings.hint, "hint"
    if config.predictor == "empty":
        return "", "empty"
    if config.predictor == "repeat":
        return s.last_delta or "", "repeat"
    tokens, _ = yield from book.greedy(s, entry_logits, cap=config.continuation_cap, stop=stop)
    return template.tokenizer.decode(tokens, skip_special_tokens=True), "continuation"


def ready_position(
    book: KVBook, s: Session, key: str, source: str, prompt: list[int], base: int, config: PreposConfig
) -> Generator[Need | None, torch.Tensor | None, ReadyPosition]:
    """Prefill ``prompt`` on ``s``, decode its sure tail (while the model is sure of the
    answer: gap over the threshold, up to an eos), and park it as a ready position whose
    rows start at ``base`` (the session's KV is left at ``base``)."""
    logits = yield from book.advance(s, prompt, background=True, chunk=config.chunk)
    eos = set(book.backend.info.eos_token_ids)
    forced, seq = yield from book.greedy(s, logits, cap=config.forced_cap, stop=eos, min_gap=config.threshold)
    return book.park(s, key, source, prompt, base, seq, forced)


def pre_position(
    book: KVBook, template: ChatTemplate, s: Session, config: PreposConfig, stop: Collection[int]
) -> Steps:
    """The whole background job for one session, one chunk per step."""
    try:
        yield from _pre_position(book, template, s, config, stop)
    except NoRoom:
        return  # idle work never evicts real state; it waits for the next turn


def _pre_position(
    book: KVBook, template: ChatTemplate, s: Session, config: PreposConfig, stop: Collection[int]
) -> Steps:
    """Entry, predicted message, ready position: see the module docstring."""
    role = next_role(s.messages)
    entry = template.entry(s.messages, role, tools=s.tools, cache=s.renders)
    entry_logits = yield from book.advance(s, entry, background=True, chunk=config.chunk)
    s.entry_len = len(entry)
    yield
    content, source = yield from predicted_prompt(book, template, s, role, config, entry_logits, stop)
    prompt = template.render([*s.messages, {"role": role, "content": content}], tools=s.tools, cache=s.renders)
    # The predicted content can merge with the entry's last token; the ready position
    # then starts where the two renderings part, and the entry is prefilled again.
    base = common_prefix(entry, prompt)
    yield from ready_position(book, s, "next", source, prompt, base, config)
    if base < len(entry):
        yield from book.advance(s, entry, background=True, chunk=config.chunk)
    s.entry_len = len(entry)
