"""``headstart serve --replicas N``: start (or join) Ray, run the Serve app, wait for Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("headstart.scaleout")

OBJECT_STORE_BYTES = 256 << 20  # replicas pass only requests and answers through Ray
APP_NAMESPACE = "headstart"
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_MIDDLEWARES = "headstart.scaleout.proxy:middlewares"  # scaleout/proxy.py: a dead replica's answer
# Serve's settings read from the environment by its processes (the proxy and the replicas),
# which inherit it from a Ray started here. ``RAY_SERVE_PROXY_USE_GRPC``: the proxy sends each
# request to its replica over the replica's gRPC server rather than as a Ray actor call,
# which costs the cluster less CPU per request (README, "Several replicas").
SERVE_ENV = {PROXY_CALLBACK: PROXY_MIDDLEWARES, "RAY_SERVE_PROXY_USE_GRPC": "1"}


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray: no dashboard, a small object store."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The raylet waits this long for its metrics agent (a Python process) to come up and
    # aborts past it; a loaded 2-core machine needs more than Ray's default.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    # A cluster joined at ``address`` needs these set where it started.
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, namespace=APP_NAMESPACE)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 namespace=APP_NAMESPACE)


def deploy(app: Any, host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and run the app there, replicas loaded."""
    from ray import serve

    from headstart.scaleout.app import APP_NAME, QUIET_LOGS

    # No access log line per request in the proxy either (the replicas have none; app.py).
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_LOGS)
    serve.run(app, name=APP_NAME, route_prefix="/")


def serve_replicas(args: argparse.Namespace) -> int:
    from ray import serve

    from headstart.scaleout.app import APP_NAME, replica_app
    from headstart.scaleout.options import ReplicaOptions
    from headstart.server.flags import server_config

    opts = ReplicaOptions.from_args(args)
    try:
        app = replica_app(server_config(args), opts)
    except ValueError as exc:
        raise SystemExit(f"headstart serve: {exc}") from exc
    start_ray(args.ray_address)
    deploy(app, args.host, args.port)
    log.info("%d replicas serving on http://%s:%d (Ctrl-C stops)", opts.replicas, args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if args.ray_address:
        serve.delete(APP_NAME)  # the cluster and its other applications stay
    else:
        serve.shutdown()
    return 0
