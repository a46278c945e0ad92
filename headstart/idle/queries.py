"""Registered questions: asked again in the background whenever the session's context changes.

A client registers a question once; after every ingested batch (or chat turn) the
session's upkeep job asks it again as an ephemeral request: the session's messages plus
the question as a user message, rendered and prefilled on the session's KV. The answer is
a few greedy tokens (or the best of the query's candidate answers), its confidence the
first token's logit gap. The state at the answer is parked as a ready position under
``query:<id>``, with the greedy answer as its tail, so the same question asked through
``generate`` while the answer is fresh is a ``ready_exact`` hit: no forward pass, and the
same tokens a cold computation gives.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Collection, Generator
from typing import TYPE_CHECKING

import torch

from headstart.decode.sampling import candidate_gap, top_gap
from headstart.errors import BadRequest, ContextTooLong, SessionExists, SessionNotFound, check_context
from headstart.session.session import Query
from headstart.session.template import ChatTemplate, common_prefix, encode_candidates

if TYPE_CHECKING:
    from headstart.session.book import KVBook, Need
    from headstart.session.session import Session

QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
QUESTION_ROLE = "user"


class QueryNotFound(SessionNotFound):
    code = "query_not_found"


class QueryExists(SessionExists):
    code = "query_exists"


class TooManyQueries(BadRequest):
    code = "too_many_queries"


READY_PREFIX = "query:"


def ready_key(query_id: str) -> str:
    return READY_PREFIX + query_id


def orphaned(s: Session) -> list[str]:
    """Keys of parked states whose question was deleted since."""
    return [k for k in list(s.ready) if k.startswith(READY_PREFIX) and k.removeprefix(READY_PREFIX) not in s.queries]


def register(s: Session, question: str, *, query_id: str | None, max_tokens: int,
             fast_answer: list[str] | None, limit: int) -> Query:
    """Add a question to ``s`` (at most ``limit`` per session)."""
    query_id = query_id or f"q-{uuid.uuid4().hex[:12]}"
    if not QUERY_ID.match(query_id):
        raise BadRequest("a query id is 1-64 characters of A-Z a-z 0-9 _ -", param="id")
    with s.data.lock:
        if query_id in s.queries:
            raise QueryExists(f"query {query_id!r} already exists on session {s.id!r}")
        if len(s.queries) >= limit:
            raise TooManyQueries(f"a session holds at most {limit} registered questions", param="question")
        q = Query(query_id, question, max_tokens, fast_answer)
        s.queries[query_id] = q
    return q


def get(s: Session, query_id: str) -> Query:
    q = s.queries.get(query_id)
    if q is None:
        raise QueryNotFound(f"no query {query_id!r} on session {s.id!r}")
    return q


def stale(s: Session) -> list[Query]:
    """Questions whose answer is not on the current context, oldest first."""
    with s.data.lock:
        return [q for q in s.queries.values() if not q.fresh(s)]


def evaluate(
    book: KVBook, template: ChatTemplate, s: Session, q: Query, *, chunk: int, context_length: int,
    stop: Collection[int],
) -> Generator[Need | None, torch.Tensor | None, bool]:
    """Answer ``q`` on ``s``'s current context and park the state; False if it cannot run."""
    version, turns = s.data.version, s.turns
    messages = [*s.messages, {"role": QUESTION_ROLE, "content": q.question}]
    prompt = template.render(messages, tools=s.tools, cache=s.renders)
    try:
        check_context(len(prompt), context_length, q.max_tokens, what="the question")
    except ContextTooLong as exc:
        q.error = str(exc)
        q.data_version, q.turns = version, turns
        return False
    own = template.entry(s.messages, QUESTION_ROLE, tools=s.tools, cache=s.renders) if s.messages else []
    base = common_prefix(own, prompt)
    logits = yield from book.advance(s, prompt, background=True, chunk=chunk)
    candidate = None
    if q.fast_answer:
        encoded = encode_candidates(template, q.fast_answer)
        first = torch.tensor([ids[0] for ids in encoded], device=logits.device)
        candidate, gap = candidate_gap(logits, first)
        value = q.fast_answer[candidate]
        tokens, seq = [], [logits]
    else:
        gap = top_gap(logits)[1]
        # The last token of an answer cut at max_tokens is not fed: no logits after it.
        tokens, seq = yield from book.greedy(s, logits, cap=q.max_tokens, stop=stop, feed_last=False)
        value = template.tokenizer.decode(tokens, skip_special_tokens=True)
    book.park(s, ready_key(q.id), "query", prompt, base, seq, tokens[: len(seq) - 1])
    q.value, q.token_ids, q.confidence, q.candidate = value.strip(), tokens, gap, candidate
    q.data_version, q.turns = version, turns
    q.answered_at = time.time()
    q.evaluations += 1
    q.error = None
    return True
