"""The refusals of the engine and its parts; each door maps them to its own status codes."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses."""


class BadRequest(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(BadRequest):
    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the context holds {limit}",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


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
