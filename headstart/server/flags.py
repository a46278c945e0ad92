"""The flags of ``headstart serve`` (and the engine flags ``chat`` and ``calibrate`` share),
and what they ask of a server: the command line and the Ray Serve builder read the same ones."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from headstart.config import (
    ATTENTION,
    BACKGROUND_CHUNK,
    CONTEXT_RESERVE,
    CPU_STEP_TOKENS,
    CUDA_STEP_TOKENS,
    GATE_CONFIDENCE,
    GATE_TARGET,
    GATE_WINDOW,
    HEARTBEAT_S,
    HOST,
    IDLE_EXPIRY_S,
    LINEAR,
    MAX_BODY_BYTES,
    MAX_EVENT_STREAMS,
    MAX_PENDING,
    MAX_QUERIES,
    MAX_SESSIONS,
    PORT,
    PREDICTOR,
    TEMPERATURE,
)
from headstart.engine.engine import EngineConfig
from headstart.idle.prepos import PREDICTORS
from headstart.model.attention import KERNELS
from headstart.model.llama import LINEARS

if TYPE_CHECKING:
    from headstart.server.app import ServerConfig


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """The ``headstart serve`` flags of one server (the replica flags are scaleout's)."""
    serve.add_argument("--host", default=HOST)
    serve.add_argument("--port", type=int, default=PORT)
    serve.add_argument("--temperature", type=float, default=TEMPERATURE,
                       help="temperature when a request names none (OpenAI's default is 1.0)")
    serve.add_argument("--db", default=None,
                       help="SQLite file or postgresql://... URL for session transcripts "
                            "(default: $HEADSTART_DATA/headstart.db; '' for none)")
    serve.add_argument("--spill-dir", default=None, help="folder for spilled KV (default: $HEADSTART_DATA/spill)")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require this key (repeatable); every endpoint but /health and /metrics then needs one")
    serve.add_argument("--api-key-file", action="append", default=None, metavar="PATH",
                       help="file of keys, one per line (# comments allowed); repeatable")
    serve.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger bodies get 413")
    serve.add_argument("--max-pending", type=int, default=MAX_PENDING,
                       help="data entries waiting per session; past it the oldest are dropped (and counted)")
    serve.add_argument("--max-queries", type=int, default=MAX_QUERIES, help="registered questions per session")
    serve.add_argument("--context-reserve", type=int, default=CONTEXT_RESERVE,
                       help="tokens of context kept free for questions on streaming-data sessions")
    serve.add_argument("--heartbeat", type=float, default=HEARTBEAT_S, help="seconds between SSE heartbeats")
    serve.add_argument("--max-event-streams", type=int, default=MAX_EVENT_STREAMS,
                       help="open /v1/sessions/{id}/events streams at once; one more gets 429 (replicas: below "
                            "--max-ongoing)")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the names requests may give as `model` (default: the model's own); the first is "
                            "the one answers carry when a request names none")
    add_threads_flag(serve)
    add_model_flags(serve)
    add_engine_flags(serve)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("HEADSTART_MODEL"),
                   help="short name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), a .gguf file or an "
                        "HF folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="model cache (default $HEADSTART_CACHE or ~/.cache/headstart)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, all cores); on a machine shared with "
                        "other jobs fewer threads are steadier")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pre-position", action="store_true", help="no idle-time work")
    p.add_argument("--no-gate", action="store_true", help="exact paths only")
    p.add_argument("--gate-target", type=float, default=GATE_TARGET,
                   help="the gate fires only where the lower confidence bound of its precision reaches this")
    p.add_argument("--gate-confidence", type=float, default=GATE_CONFIDENCE,
                   help="the confidence of that bound (one-sided Clopper-Pearson)")
    p.add_argument("--gate-window", type=int, default=GATE_WINDOW,
                   help="recent verified answers the gate's calibration rests on, per key")
    p.add_argument("--gap-threshold", type=float, default=None,
                   help="a fixed logit-gap threshold instead: no guarantee (default: none, the guaranteed gate)")
    p.add_argument("--predictor", choices=PREDICTORS, default=PREDICTOR,
                   help="what pre-positioning assumes the next message is")
    p.add_argument("--background-chunk", type=int, default=BACKGROUND_CHUNK, help="tokens per background chunk")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="tokens one step's forward holds: every running decode's token, then prefill chunks, "
                        f"then idle-time work in what is left (default: {CPU_STEP_TOKENS} on CPU, "
                        f"{CUDA_STEP_TOKENS} on CUDA)")
    p.add_argument("--kv-budget", type=parse_bytes, default=None,
                   help="bytes of KV all sessions may hold, e.g. 2GiB (default: a quarter of RAM, 40%% of free GPU)")
    p.add_argument("--spill", choices=("auto", "on", "off"), default="auto",
                   help="write evicted KV to disk and reload it (auto: on for CPU, where it is faster)")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS)
    p.add_argument("--idle-expiry", type=float, default=IDLE_EXPIRY_S, help="seconds before an idle session is deleted")
    p.add_argument("--max-context", type=int, default=None, help="tokens per session (default: the model's)")
    add_kernel_flags(p)


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """The own runner's kernels (llama and qwen2; other models refuse anything but the defaults)."""
    p.add_argument("--attention", choices=KERNELS, default=ATTENTION,
                   help="attention kernel (default %(default)s): sdpa is batch invariant (a sequence gets the same "
                        "bits alone or beside others); tiled is also chunk invariant (a prompt prefilled in chunks "
                        "gets the bits it gets at once), at a cost in prefill and decode speed")
    p.add_argument("--linear", choices=LINEARS, default=LINEAR,
                   help="linear layers' kernel (default %(default)s): onednn is batch invariant in float32 on the CPU "
                        "(elsewhere it means mkl); mkl is F.linear, transformers' own kernel (its bits; batch "
                        "invariant by padding products to groups of four rows), slower on the CPU; fp16 is fbgemm's "
                        "on a half-precision copy of the weights (CPU, float32 models): faster decode, logits near "
                        "but not equal to float32's, batch invariant")


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MB``, ``1e9``: a byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(float(lowered))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.step_tokens is not None and args.step_tokens < 1:
        print("headstart: --step-tokens must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    if not (0.0 < args.gate_target < 1.0 and 0.0 < args.gate_confidence < 1.0 and args.gate_window >= 1):
        print("headstart: --gate-target and --gate-confidence must be in (0, 1), --gate-window at least 1",
              file=sys.stderr)
        raise SystemExit(2)
    return EngineConfig(
        pre_position=not args.no_pre_position,
        gate=not args.no_gate,
        gap_threshold=args.gap_threshold,
        gate_target=args.gate_target,
        gate_confidence=args.gate_confidence,
        gate_window=args.gate_window,
        predictor=args.predictor,
        background_chunk=args.background_chunk,
        step_tokens=args.step_tokens,
        kv_budget=args.kv_budget,
        spill={"auto": None, "on": True, "off": False}[args.spill],
        max_sessions=args.max_sessions,
        idle_expiry_s=args.idle_expiry,
        max_context=args.max_context,
        attention=args.attention,
        linear=args.linear,
    )


def api_keys(args: argparse.Namespace) -> frozenset[str]:
    """Keys from --api-key (repeatable), --api-key-file and $HEADSTART_API_KEY."""
    from headstart.server.auth import read_key_file

    keys = list(args.api_key or [])
    for path in args.api_key_file or []:
        keys.extend(read_key_file(path))
    if os.environ.get("HEADSTART_API_KEY"):
        keys.append(os.environ["HEADSTART_API_KEY"])
    return frozenset(k for k in keys if k)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """What the ``serve`` flags ask of each server (one, or every replica)."""
    import dataclasses

    from headstart.server.app import ServerConfig

    set_threads(args)
    engine = dataclasses.replace(
        engine_config(args),
        max_pending=args.max_pending,
        max_queries=args.max_queries,
        context_reserve=args.context_reserve,
    )
    return ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        engine=engine,
        default_temperature=args.temperature,
        db=args.db,
        spill_dir=args.spill_dir,
        max_body_bytes=args.max_body_bytes,
        api_keys=api_keys(args),
        heartbeat_seconds=args.heartbeat,
        max_event_streams=args.max_event_streams,
        served_model_names=tuple(args.served_model_name or ()),
    )
