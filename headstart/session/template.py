"""Chat messages to token ids, and the parts of the next turn that are certain.

Everything is found by rendering the model's own chat template, never by assuming its
format: the entry is the common part of two renderings that differ only in the next
message's content, and correctness elsewhere rests on comparing token ids.

Rendering text is cheap; tokenising it is not (7 ms for 2,600 tokens here). A session's
next conversation repeats its last one, so a :class:`RenderCache` keeps the last
rendering and the next request tokenises only what follows the last message opening the
two texts share. That is exact, not an approximation: a tokenizer splits its text at
special tokens before anything else and encodes the pieces apart, so the ids before a
special token depend only on the text before it (checked at start-up that the opening
token is such a token and no other special token contains it).

A request often sends exactly the conversation idle time already rendered (a ready
position's prediction, a warm, a registered question): the cache also keeps the last few
renderings by their inputs, and the same inputs give the rendering's ids without running
the template. That is exact too: the template is a function of the messages, the tools and
the generation prompt alone (a template that reads the clock, ``strftime_now``, is always
run), and inputs count as the same only when equal in type as well as value all the way
down (``1``, ``1.0`` and ``True`` are equal in Python and render differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from headstart.errors import BadRequest

Message = dict[str, Any]

_PLACEHOLDERS = ("\x01alpha placeholder", "\x02omega placeholder")
RECENT = 4  # renderings a session's cache keeps by their inputs


class _Unkeyable(Exception):
    """A value whose rendering the cache cannot tell apart from another's by comparing it."""


def _frozen(value: Any) -> Any:
    """``value`` as a comparable tuple that equals another's only when the two are equal in
    type and value all the way down (dicts in their order: a template iterates them so)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return kind, value
    if kind is float:
        return kind, repr(value)  # -0.0 == 0.0, and renders differently
    if kind is dict:
        return kind, tuple((_frozen(k), _frozen(v)) for k, v in value.items())
    if kind is list or kind is tuple:
        return kind, tuple(_frozen(v) for v in value)
    raise _Unkeyable


def _inputs(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None, generation_prompt: bool) -> Any:
    """What a rendering depends on, frozen; None when some value cannot be compared exactly."""
    try:
        return _frozen(list(messages)), _frozen(list(tools) if tools else None), generation_prompt
    except _Unkeyable:
        return None


class TemplateError(ValueError):
    """The chat template cannot render what was asked (bad roles, tools unsupported...).

    ``param`` names the request field at fault, for the door's error answer.
    """

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences.

    A request's first step compares its ~2,000 prompt ids with the session's KV: slices
    compared in C, halving the part that differs, instead of a Python loop over each id."""
    n = min(len(a), len(b))
    x, y = list(a[:n]), list(b[:n])  # one type: a list never equals a tuple
    if x == y:
        return n
    lo, hi = 0, n - 1  # the first difference is at lo or after, at hi or before
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if x[lo:mid] == y[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Rendered:
    """A rendering: its text, its ids, and where each message opens in both
    (``cuts[i]`` = (character offset, token index) of the i-th opening token)."""

    text: str
    ids: tuple[int, ...]
    cuts: tuple[tuple[int, int], ...]


class RenderCache:
    """What a session's next rendering reuses: its last rendering, and the entry of the
    next role. Read and replaced whole (one reference each), so the threads that render
    for a session (a door's worker, the model thread) need no lock: any rendering they
    find is checked against the new text before a token of it is reused."""

    def __init__(self) -> None:
        self.last: Rendered | None = None
        self.entry: tuple[list[Message], str, Any, list[int]] | None = None
        self.recent: tuple[tuple[Any, Rendered], ...] = ()  # (inputs, rendering), the latest first


class ChatTemplate:
    """Renders conversations with a tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise TemplateError("the model has no chat template")
        self.tokenizer = tokenizer
        self.supports_tools = "tools" in tokenizer.chat_template
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_message = end if isinstance(end, int) and end >= 0 else tokenizer.eos_token_id
        self._opening, self._opening_id = self._cut_token()
        # A template that reads the clock renders the same messages differently over time.
        self._pure = "strftime_now" not in tokenizer.chat_template
        # A fast tokenizer's Rust backend, called directly (see encode_chat).
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None

    def _cut_token(self) -> tuple[str | None, int | None]:
        """The token a message opens with, if tokens can be reused up to it: a special
        token the tokenizer splits on (a fast tokenizer that does not split special
        tokens) that no other special token contains."""
        tok = self.tokenizer
        text = "<|im_start|>"
        ident = tok.convert_tokens_to_ids(text)
        added = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values()}
        if (
            not getattr(tok, "is_fast", False)
            or getattr(tok, "split_special_tokens", False)
            or not isinstance(ident, int)
            or text not in added
            or any(text in other for other in added if other != text)
        ):
            return None, None
        return text, ident

    def render(
        self,
        messages: Sequence[Message],
        *,
        generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        cache: RenderCache | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` (plus the assistant's generation prompt); with a
        ``cache``, the ids of a recent rendering of the same inputs, or else the tokens of its
        last rendering up to where the texts part are reused."""
        if cache is None or self._opening is None:
            return self.encode_chat(self.render_text(messages, generation_prompt=generation_prompt, tools=tools))
        inputs = _inputs(messages, tools, generation_prompt) if self._pure else None
        if inputs is not None:
            hit = next((r for key, r in cache.recent if key == inputs), None)  # read once, replaced whole
            if hit is not None:
                cache.last = hit
                return list(hit.ids)
        text = self.render_text(messages, generation_prompt=generation_prompt, tools=tools)
        rendered = self._tokenise(text, cache.last)
        cache.last = rendered
        if inputs is not None:
            cache.recent = ((inputs, rendered), *cache.recent[: RECENT - 1])
        return list(rendered.ids)

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered conversation, as ``apply_chat_template`` tokenises it.

        A fast tokenizer's call sets the backend's truncation, padding and special-token
        splitting, then asks the backend; with those already as the call would set them the
        backend is asked directly, which skips ~0.3 ms of Python on every request's new part."""
        tok, backend = self.tokenizer, self._backend
        if (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))
        ):
            return backend.encode(text, add_special_tokens=False).ids
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _tokenise(self, text: str, base: Rendered | None) -> Rendered:
        """``text`` tokenised, reusing ``base``'s ids before the last message opening the
        two texts share (the ids before a special token depend only on the text before it)."""
        opening = self._opening
        assert opening is not None
        reuse = (0, 0)
        kept: tuple[tuple[int, int], ...] = ()
        if base is not None:
            # Where the old text ends counts too when the new one opens a message there:
            # the old text's last piece ended at its end, as the new one's does at the opening.
            ends = ((len(base.text), len(base.ids)), base.cuts)
            candidates = [ends, *((base.cuts[i], base.cuts[:i]) for i in range(len(base.cuts) - 1, -1, -1))]
            for (at, n), before in candidates:
                if text.startswith(opening, at) and text.startswith(base.text[:at]):
                    reuse, kept = (at, n), before
                    break
        at, n = reuse
        head = base.ids[:n] if base is not None else ()
        tail = self.encode_chat(text[at:])
        ids = (*head, *tail)
        found = []
        pos = text.find(opening, at)
        while pos != -1:
            found.append(pos)
            pos = text.find(opening, pos + 1)
        marks = [n + i for i, t in enumerate(tail) if t == self._opening_id]
        if len(found) != len(marks):  # an opening not tokenised as one token: reuse nothing of this one
            return Rendered(text, tuple(self.encode_chat(text)), ())
        return Rendered(text, ids, (*kept, *zip(found, marks, strict=True)))

    def render_text(
        self,
        messages: Sequence[Message],
        *,
        generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The text of ``messages`` as the template writes it."""
        if tools and not self.supports_tools:
            raise TemplateError(
                "this model's chat template has no tool support, so a request with `tools` cannot be "
                "served; start headstart with a tool-capable model (--model qwen2.5-coder-0.5b)",
                param="tools",
            )
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja raises many kinds for bad input
            raise TemplateError(f"the chat template cannot render these messages: {exc}") from exc

    def entry(
        self,
        messages: Sequence[Message],
        role: str = "user",
        tools: Sequence[dict[str, Any]] | None = None,
        cache: RenderCache | None = None,
    ) -> list[int]:
        """Ids of ``messages`` followed by the tokens certain to open a ``role`` message.

        Rendering the conversation with two different placeholder contents for the next
        message and keeping the common part finds the closing of the last turn and the
        header of the next one, whatever the template looks like. A ``cache`` keeps the
        result for the same messages, role and tools (a session asks several times a turn).
        """
        if cache is not None and cache.entry is not None:
            seen, seen_role, seen_tools, ids = cache.entry
            if seen_role == role and seen_tools == tools and seen == list(messages):
                return list(ids)
        a, b = (
            self.render([*messages, {"role": role, "content": p}], generation_prompt=False, tools=tools, cache=cache)
            for p in _PLACEHOLDERS
        )
        ids = a[: common_prefix(a, b)]
        if cache is not None:
            cache.entry = (list(messages), role, tools, ids)
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def encode_candidates(template: ChatTemplate, fast_answer: list[str]) -> list[list[int]]:
    """A ``fast_answer`` list as token ids, refused the same way wherever one comes in (a
    request, a registered question): each candidate is picked by its first token."""
    if not fast_answer or any(not isinstance(c, str) or not c for c in fast_answer):
        raise BadRequest("fast_answer must be a non-empty list of non-empty strings", param="fast_answer")
    encoded = [template.encode(c) for c in fast_answer]
    for i, ids in enumerate(encoded):
        if not ids:
            raise BadRequest(f"candidate {i} encodes to no tokens", param=f"fast_answer[{i}]")
    return encoded
