"""Idle-time work per session: ingest pushed data, registered questions, pre-positioning."""
