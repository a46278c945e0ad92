"""The ``headstart serve`` flags for replicas (imported by the CLI without Ray)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from headstart.config import MAX_ONGOING, REPLICA_CPUS, REPLICA_GPUS


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None,
                   help="run N replicas on Ray Serve behind its proxy, sessions pinned by id (needs --db postgresql://)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting a local Ray")
    p.add_argument("--replica-cpus", type=float, default=REPLICA_CPUS,
                   help="Ray CPUs each replica reserves (0: no reservation)")
    p.add_argument("--replica-gpus", type=float, default=REPLICA_GPUS, help="Ray GPUs each replica reserves")
    p.add_argument("--max-ongoing", type=int, default=MAX_ONGOING,
                   help="Serve slots per replica; each open stream holds one")
    p.add_argument("--no-affinity", action="store_true",
                   help="route every request to a random replica (a baseline: sessions then rebuild on each move)")


@dataclass(frozen=True)
class ReplicaOptions:
    """How the Serve deployment places and routes its replicas."""

    replicas: int = 2
    cpus: float = REPLICA_CPUS
    gpus: float = REPLICA_GPUS
    max_ongoing: int = MAX_ONGOING
    affinity: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReplicaOptions:
        if args.replicas is None or args.replicas < 1:
            raise SystemExit("--replicas must be at least 1")
        return cls(args.replicas, args.replica_cpus, args.replica_gpus, args.max_ongoing, not args.no_affinity)
