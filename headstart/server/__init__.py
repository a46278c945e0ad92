"""The HTTP door: the OpenAI-compatible API, the sessions API, metrics and keys, over the engine."""
