"""The refusals of the engine and its parts; each door maps them to its own status codes."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses."""


class BadRequest(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(BadRequest):
    def __init__(self, prompt_tokens: int, limit: int, answer_tokens: int = 1, what: str = "the prompt") -> None:
        more = f" and asks for {answer_tokens} more" if answer_tokens > 1 else ""
        super().__init__(f"{what} has {prompt_tokens} tokens{more} but the context holds {limit}", param="messages")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


def check_context(prompt_tokens: int, limit: int, answer_tokens: int = 1, what: str = "the prompt") -> None:
    """The one length check: a prompt and at least ``answer_tokens`` of answer must fit the
    context (a request, a warm, a registered question)."""
    if prompt_tokens + answer_tokens > limit:
        raise ContextTooLong(prompt_tokens, limit, answer_tokens, what)


class SessionNotFound(EngineError):
    pass


class SessionBusy(EngineError):
    pass


class SessionExists(EngineError):
    pass


class TooManySessions(EngineError):
    pass


class StoreUnavailable(EngineError):
    """The session store could not commit (disk full, read-only, I/O error): what was asked
    is not durable, so it is refused rather than acknowledged."""


class SessionMoved(EngineError):
    """Another replica claimed the session since this one did: this one may no longer write it."""
