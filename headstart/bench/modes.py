"""The modes a benchmark compares: what each one keeps between requests and does while idle.

Every headstart mode runs in-process on the same loaded model through the same engine
code (scheduler, decode, paths), so the only thing that differs between two modes is the
state they keep and the idle-time work they do. The peer mode (llama.cpp over HTTP) lives
in :mod:`headstart.bench.peer_llamacpp`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from headstart.config import ATTENTION, GATE_CONFIDENCE, GATE_TARGET, LINEAR, PREDICTOR
from headstart.engine.engine import EngineConfig
from headstart.idle.prepos import PREDICTORS

BASE_MODES = ("stateless", "prefix_cache", "session", "prepositioned", "gate")
PEERS = ("llamacpp",)
# The gate mode's fixed logit-gap threshold unless --gap-threshold says otherwise: the mode
# measures the gate path itself; the report's guaranteed calibration says where the server's
# default gate (a precision bound) would fire on the same run.
BENCH_GAP = 2.0


@dataclass(frozen=True)
class ModeSpec:
    """One way of serving the workload.

    ``sessions``: requests carry a session id (persistent KV); otherwise each request is
    a one-off. ``query``: the client registers its recurring question (a stream session's
    decision question), which pre-positioning then targets (a session hint in the engine).
    ``exact``: outputs must equal ``stateless`` token for token, or the run fails.
    """

    name: str
    description: str
    config: EngineConfig
    sessions: bool
    exact: bool
    query: bool = False

    @property
    def pre_positions(self) -> bool:
        return self.sessions and self.config.pre_position


def mode_specs(
    names: list[str],
    *,
    gap_threshold: float | None = BENCH_GAP,
    target: float = GATE_TARGET,
    confidence: float = GATE_CONFIDENCE,
    predictor: str = PREDICTOR,
    prefix_blocks: int = 1024,
    prefix_block: int = 16,
    background_chunk: int = 16,
    attention: str = ATTENTION,
    linear: str = LINEAR,
) -> list[ModeSpec]:
    """Specs for ``names``; ``prepositioned:PREDICTOR`` compares predicted deltas. The gate
    mode fires at ``gap_threshold``, or with None as the server's guaranteed gate does
    (precision bound ``target`` at ``confidence``, calibrated online during the run)."""
    base = EngineConfig(pre_position=False, gate=False, predictor=predictor, background_chunk=background_chunk,
                        attention=attention, linear=linear)
    specs = []
    for name in names:
        mode, _, variant = name.partition(":")
        if variant and (mode not in ("prepositioned", "gate") or variant not in PREDICTORS):
            raise ValueError(f"bad mode {name!r}: a variant is prepositioned:PREDICTOR, PREDICTOR in {PREDICTORS}")
        pred = variant or predictor
        if mode == "stateless":
            spec = ModeSpec(name, "every request computed from scratch", base, sessions=False, exact=True)
        elif mode == "prefix_cache":
            spec = ModeSpec(
                name,
                f"shared {prefix_block}-token block prefix cache, LRU over {prefix_blocks} blocks, no idle work",
                replace(base, prefix_cache_blocks=prefix_blocks, kv_block=prefix_block),
                sessions=False,
                exact=True,
            )
        elif mode == "session":
            spec = ModeSpec(name, "persistent session KV, no idle work", base, sessions=True, exact=True)
        elif mode == "prepositioned":
            spec = ModeSpec(
                name,
                f"session KV + entry and ready position in idle time (predictor: {pred}), gate off",
                replace(base, pre_position=True, predictor=pred),
                sessions=True,
                exact=True,
                query=True,
            )
        elif mode == "gate":
            how = (f"guaranteed (precision bound {target:g} at confidence {confidence:g})" if gap_threshold is None
                   else f"at logit gap {gap_threshold:g}")
            spec = ModeSpec(
                name,
                f"prepositioned + the confidence gate {how} (predictor: {pred})",
                replace(base, pre_position=True, gate=True, gap_threshold=gap_threshold, gate_target=target,
                        gate_confidence=confidence, predictor=pred),
                sessions=True,
                exact=False,
                query=True,
            )
        else:
            raise ValueError(f"unknown mode {name!r}: choose from {BASE_MODES} (or prepositioned:PREDICTOR)")
        specs.append(spec)
    return specs
