"""Model layer: load a causal LM and run tokens over KV states. Knows nothing of sessions."""

from headstart.model.backend import Backend, KVState, KVSuffix, ModelInfo
from headstart.model.hf import HFBackend, load

__all__ = ["Backend", "HFBackend", "KVState", "KVSuffix", "ModelInfo", "load"]
