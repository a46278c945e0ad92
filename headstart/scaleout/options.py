"""The ``headstart serve`` flags for replicas (imported by the CLI without Ray)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Serve slots per replica: every open SSE stream (chat or /events) holds one for its whole
# life, so the slots are many and the engine's own admission (one request per session,
# the KV budget, the model thread's queue) bounds the compute. /events streams are capped
# below this (--max-event-streams, 192 by default), so at least the difference (64) is
# always left to turns.
DEFAULT_MAX_ONGOING = 256


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None,
                   help="run N replicas on Ray Serve behind its proxy, sessions pinned by id (needs --db postgresql://)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting a local Ray")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves (0: no reservation)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs each replica reserves")
    p.add_argument("--max-ongoing", type=int, default=DEFAULT_MAX_ONGOING,
                   help="Serve slots per replica; each open stream holds one")
    p.add_argument("--no-affinity", action="store_true",
                   help="route every request to a random replica (a baseline: sessions then rebuild on each move)")


@dataclass(frozen=True)
class ReplicaOptions:
    """How the Serve deployment places and routes its replicas."""

    replicas: int = 2
    cpus: float = 1.0
    gpus: float = 0.0
    max_ongoing: int = DEFAULT_MAX_ONGOING
    affinity: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReplicaOptions:
        if args.replicas is None or args.replicas < 1:
            raise SystemExit("--replicas must be at least 1")
        return cls(args.replicas, args.replica_cpus, args.replica_gpus, args.max_ongoing, not args.no_affinity)
