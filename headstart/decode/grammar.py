"""Constrained decoding: a grammar's mask over the vocabulary, token by token (xgrammar).

A :class:`~headstart.decode.sampling.Constraint` (any JSON object, JSON under a schema, or tool
calls in the chat template's envelope with each function's arguments under its schema, as
an xgrammar structural tag built by tools.py) is compiled once per distinct constraint for
the model's tokenizer; each request gets its own
matcher, which logits.py asks for the forbidden tokens at every position and moves past each
chosen token. xgrammar was chosen over llguidance by timing both on this CPU with the same
vocabulary and schema (the figures: README, "Structured outputs"; python -m
headstart.bench.grammar measures them again).

JSON is generated compact (no free whitespace), so a small model cannot wander into an
endless run of blanks; the stop tokens end the answer once the grammar accepts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable

import numpy as np
import torch

from headstart.decode.sampling import Constraint

KEPT = 64  # compiled constraints kept per model


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile or, under ``strict``, cannot fully honour
    (the door answers 400 naming ``param``)."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


# JSON Schema keywords the grammar enforces (each checked against xgrammar 0.2 by feeding it a
# value that breaks only that keyword), and those that only annotate. Under ``strict`` a
# schema may use nothing else: xgrammar ignores ``not``, ``if``/``then``/``else``,
# ``oneOf``'s exclusivity, ``allOf`` of several schemas, ``multipleOf`` on numbers and the
# ``content*`` keywords, so output could break them.
ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "properties", "required", "additionalProperties",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "unevaluatedProperties",
    "dependentRequired", "items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum",
})
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "$defs", "definitions",
})
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "unevaluatedProperties", "propertyNames", "contains")


def strict_problem(schema: object, path: str = "") -> str | None:
    """Where and why a strict schema asks for what the grammar cannot enforce (None: it can)."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{path or 'the schema'} must be a JSON Schema object"
    for key, value in schema.items():
        here = f"{path}.{key}" if path else key
        if key in ("allOf", "oneOf") and isinstance(value, list) and len(value) > 1:
            return f"{here}: {key} of several schemas is not enforced by the grammar (use anyOf)"
        if key == "multipleOf" and schema.get("type") == "integer":
            continue
        if key == "format" and value not in FORMATS:
            return f"{here}: the format {value!r} is not enforced (supported: {', '.join(sorted(FORMATS))})"
        if key not in ENFORCED and key not in ANNOTATIONS and key not in ("allOf", "oneOf"):
            return f"{here}: the keyword {key!r} is not enforced by the grammar, so strict output could break it"
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                if (problem := strict_problem(sub, f"{here}.{name}")) is not None:
                    return problem
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                if (problem := strict_problem(sub, f"{here}[{i}]")) is not None:
                    return problem
        elif key in _SUBSCHEMAS and (problem := strict_problem(value, here)) is not None:
            return problem
    return None


def json_grammar(schema: dict, *, strict: bool, param: str) -> str:
    """The grammar (EBNF) of JSON valid under ``schema``, written as chat templates' ``tojson``
    writes it (``", "`` and ``": "``, no other blanks), so a call's arguments look like the
    ones the model read in its prompt. Refuses a schema the grammar cannot compile, or
    (``strict``) cannot fully enforce."""
    import xgrammar as xgr

    if strict and (problem := strict_problem(schema)) is not None:
        raise GrammarError(f"strict: {problem}", param=param)
    try:
        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": ")))
    except Exception as exc:  # xgrammar raises several kinds for schemas it cannot take
        raise GrammarError(f"the JSON schema cannot be compiled: {exc}", param=param) from exc


class Grammars:
    """The compiler for one model's tokenizer, and its compiled constraints."""

    def __init__(self, tokenizer: object, vocab: int, stop_ids: Iterable[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab = vocab
        self._stop = sorted(set(stop_ids))
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=self._stop)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compiled: dict[Constraint, object] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> object:
        """The compiled grammar of ``constraint``, compiled on first use and kept."""
        with self._lock:
            if constraint in self._compiled:
                return self._compiled[constraint]
            try:
                if constraint.kind == "tool_calls":
                    compiled = self._compiler.compile_structural_tag(constraint.schema)
                else:
                    schema = '{"type": "object"}' if constraint.kind == "json_object" else constraint.schema
                    compiled = self._compiler.compile_json_schema(schema, any_whitespace=False)
            except Exception as exc:  # xgrammar raises several kinds for what it cannot take
                param = "tools" if constraint.kind == "tool_calls" else "response_format"
                raise GrammarError(f"the grammar cannot be compiled: {exc}", param=param) from exc
            self._compiled[constraint] = compiled
            if len(self._compiled) > KEPT:
                del self._compiled[next(iter(self._compiled))]  # the oldest
            return compiled

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        return GrammarMatcher(self._xgr, self.compile(constraint), self.vocab)


class GrammarMatcher:
    """One request's position in its grammar (logits.Matcher)."""

    def __init__(self, xgr: object, compiled: object, vocab: int) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)  # type: ignore[attr-defined]
        self._bitmask = xgr.allocate_token_bitmask(1, vocab)  # type: ignore[attr-defined]
        self._vocab = vocab

    def forbidden(self, vocab: int) -> torch.Tensor:
        """The mask's bits (bit j of word i: token 32 * i + j) unpacked by numpy, on the
        calling thread, for the reason logits.fresh gives."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        words = self._bitmask[0].numpy().astype("<i4", copy=False)  # little-endian: byte k holds bits 8k..8k+7
        allowed = np.unpackbits(words.view(np.uint8), count=self._vocab, bitorder="little")
        return torch.from_numpy(allowed == 0)

    @property
    def terminated(self) -> bool:
        """Whether the grammar has taken its stop token (nothing may follow)."""
        return bool(self._matcher.is_terminated())

    def accept(self, token: int) -> None:
        if not self.terminated and not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} was chosen although the grammar forbids it")


def schema_text(schema: dict) -> str:
    """A schema as the hashable text a Constraint carries (key order kept: the grammar writes
    properties in the order the schema declares them, as OpenAI's strict outputs do)."""
    return json.dumps(schema, separators=(",", ":"))
