"""The Ray Serve application: N replicas of the headstart app, each session on one of them.

``serve run headstart.scaleout.app:build_app db=postgresql://... replicas=4`` (or a Serve
config file naming ``build_app``, see the README) builds it from the same flags as
``headstart serve``; ``headstart serve --replicas N`` builds and runs it (run.py).

Each replica is a Serve ingress deployment whose ASGI app is the single-server app
(server/app.py) on its own engine, named after the replica: the name fences its writes to
the shared store and is reported in the ``x-headstart-replica`` header of every answer and
in chat's ``headstart`` object. ``/replicas/{name}/metrics`` reaches one replica's
``/metrics`` (router.py picks that replica), and ``/replicas`` lists them in Prometheus's
HTTP service-discovery format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from headstart.scaleout.options import ReplicaOptions
from headstart.server.app import ServerConfig, create_app, default_factory

APP_NAME = "headstart"
DEPLOYMENT = "HeadstartReplica"
ROUTER = "headstart.scaleout.router:SessionRouter"
REPLICA_HEADER = "x-headstart-replica"
REPLICA_METRICS = re.compile(r"^/replicas/([A-Za-z0-9]+)/metrics$")
ACTOR_PREFIX = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#"
QUIET_LOGS = {"enable_access_log": False}

Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def live_replicas() -> list[str]:
    """The names of the replicas alive in the cluster (from Ray's actor directory)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"][len(ACTOR_PREFIX):] for a in names if a["name"].startswith(ACTOR_PREFIX))


def _json(status: int, payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


def replica_door(app: ASGI, name: str) -> ASGI:
    """The app as one replica serves it: every answer names the replica; ``/replicas``
    lists them for a scraper, and ``/replicas/{name}/metrics`` is this replica's ``/metrics``."""
    tag = (REPLICA_HEADER.encode(), name.encode())

    async def door(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), tag]}
            await send(message)

        path = scope.get("path", "")
        if path == "/replicas" and scope.get("method") == "GET":
            host = next((v.decode() for k, v in scope.get("headers", []) if k == b"host"), "127.0.0.1:8000")
            sd = [{"targets": [host], "labels": {"__metrics_path__": f"/replicas/{r}/metrics", "replica": r}}
                  for r in live_replicas()]
            for message in _json(200, sd):
                await tagged(message)
            return
        m = REPLICA_METRICS.match(path)
        if m is not None:
            if m.group(1) != name:  # the router could not find that replica: it is gone
                error = {"error": {"message": f"no live replica {m.group(1)!r}", "type": "not_found_error",
                                   "param": None, "code": "replica_not_found"}}
                for message in _json(404, error):
                    await tagged(message)
                return
            scope = {**scope, "path": "/metrics", "raw_path": b"/metrics"}
        await app(scope, receive, tagged)

    return door


@serve.ingress()
class HeadstartReplica:
    """One replica: the single-server app on its own engine, its model loaded before it
    takes a request (Serve routes to it once this constructor returns)."""

    def __init__(self, config: ServerConfig) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        spill = config.spill_dir
        if spill:  # a spill folder belongs to one engine: one below it per replica
            spill = str(Path(spill) / self.name)
        elif spill is None:
            from headstart.session.store import default_data_dir

            spill = str(default_data_dir() / "spill-replicas" / self.name)
        self.config = dataclasses.replace(config, replica=self.name, spill_dir=spill)
        engine = default_factory(self.config)()
        self._app = create_app(self.config, factory=lambda: engine)

    def __serve_build_asgi_app__(self) -> ASGI:
        return replica_door(self._app, self.name)


def deployment_options(opts: ReplicaOptions) -> dict[str, Any]:
    """Serve's settings for a deployment of replicas (the benchmark's floor app has them too)."""
    router = RequestRouterConfig(
        request_router_class=ROUTER,
        # No fallback replicas: a session waits for its own replica rather than be served
        # (and claimed away) by a neighbour while its replica is merely busy.
        request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0, "affinity": opts.affinity},
    )
    return {
        "num_replicas": opts.replicas,
        "max_ongoing_requests": opts.max_ongoing,
        "ray_actor_options": {"num_cpus": opts.cpus, "num_gpus": opts.gpus},
        "request_router_config": router,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 20.0,
        # Serve's access log line costs each replica CPU on every request (see run.py).
        "logging_config": QUIET_LOGS,
    }


def replica_app(config: ServerConfig, opts: ReplicaOptions) -> Any:
    """The Serve application (bind it with ``serve.run`` or return it from a builder)."""
    if not (config.db or "").startswith(("postgresql://", "postgres://")):
        raise ValueError("replicas share sessions through PostgreSQL: pass --db postgresql://USER@HOST/DB")
    if config.max_event_streams >= opts.max_ongoing:
        raise ValueError(f"--max-event-streams ({config.max_event_streams}) must stay below --max-ongoing "
                         f"({opts.max_ongoing}): each open event stream holds one of a replica's slots, and turns "
                         "need the rest")
    deployment = serve.deployment(HeadstartReplica, name=DEPLOYMENT).options(**deployment_options(opts))
    return deployment.bind(config)


def flags(args: dict[str, Any]) -> list[str]:
    """``{"db": "...", "no_gate": True}`` as ``["--db", "...", "--no-gate"]``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder: ``args`` are ``headstart serve`` flags without dashes."""
    from headstart.scaleout.options import add_replica_flags
    from headstart.server.flags import add_serve_flags, server_config

    parser = argparse.ArgumentParser(prog="headstart serve")
    add_serve_flags(parser)
    add_replica_flags(parser)
    parsed = parser.parse_args(flags({"replicas": 1, **args}))
    return replica_app(server_config(parsed), ReplicaOptions.from_args(parsed))
