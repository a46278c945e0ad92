"""Which replica serves a request: Ray Serve's consistent-hash ring, keyed by session.

The proxy hands the ring the ``x-session-id`` header; the sessions API names its session in
the path instead (``/v1/sessions/{id}/...``), which the proxy does not read, so this router
takes the id from the request's path when no header gave one. Requests without a session
hash on their own request id: they spread evenly. With ``affinity`` off every request
hashes on its request id (the benchmark's random-routing baseline). A request for
``/replicas/{name}/metrics`` (without the header) goes to the replica of that name, so a
scraper reaches each.

The path is read from the proxy's serialised ASGI scope (the request's only argument on
the way to a replica): an internal format of the pinned Ray version, which the affinity
tests exercise through the real proxy.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

SESSION_PATH = re.compile(r"^/v1/sessions/([A-Za-z0-9_-]{1,128})(?:/|$)")
REPLICA_PATH = re.compile(r"^/replicas/([A-Za-z0-9]+)/metrics$")


def session_in_path(path: str) -> str | None:
    m = SESSION_PATH.match(path)
    return m.group(1) if m else None


class SessionRouter(ConsistentHashRouter):
    """Consistent hashing on the session id, from the header or the path."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._affinity = bool(kwargs.pop("affinity", True))
        super().initialize_state(**kwargs)

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        if pending_request is not None and not pending_request.metadata.session_id:
            # Only a request without the header needs its path, read from the pickled
            # scope; a session id found there becomes the request's session id, as if
            # the client had sent the header, and the ring routes on it.
            path = _path(pending_request)
            m = REPLICA_PATH.match(path)
            if m is not None:
                named = [r for r in candidate_replicas if r.replica_id.unique_id == m.group(1)]
                if named:
                    return [named]
            pending_request.metadata.session_id = session_in_path(path) or ""
        return await super().choose_replicas(candidate_replicas, pending_request)

    def _routing_key(self, pending_request: Any) -> str | None:
        if pending_request is not None and not self._affinity:
            return pending_request.metadata.internal_request_id
        return super()._routing_key(pending_request)


def _path(pending_request: Any) -> str:
    """The HTTP path of a request the proxy forwards ("" for anything else)."""
    if pending_request is None or not pending_request.metadata.is_http_request or not pending_request.args:
        return ""
    arg = pending_request.args[0]
    if not isinstance(arg, bytes):
        return ""
    try:
        return pickle.loads(arg).asgi_scope.get("path", "")
    except Exception:  # not the proxy's serialised request: no path to read
        return ""
