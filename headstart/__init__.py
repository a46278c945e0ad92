"""headstart: a stateful LLM inference server that works while it waits."""

__version__ = "0.1.0"
