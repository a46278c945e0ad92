"""Sessions and their KV: state, lifecycle and eviction, templates, tools, durable transcripts."""
