"""Every knob's default, once. EngineConfig, ServerConfig, the session limits, the
pre-positioning job, the gate, the replica options and the command-line flags all read
their defaults from here, so a default is changed in one place and the docs, the flags'
``--help`` and the code cannot disagree. Imports nothing: every layer may read it."""

# The confidence gate: it fires only where the lower Clopper-Pearson bound (at
# GATE_CONFIDENCE) of its precision over the last GATE_WINDOW verified answers of a
# calibration key reaches GATE_TARGET; old evidence ages out of the window.
GATE_TARGET = 0.95
GATE_CONFIDENCE = 0.95
GATE_WINDOW = 512
GATE_MAX_KEYS = 4096  # calibration keys kept (least recently used dropped first)

# Pre-positioning. Measured on the benchmark's agent workload (README, "Which predicted
# delta"): all predictors reach the same coverage at the target precision, and the empty
# message costs the least background work, so it is the default.
PREDICTOR = "empty"
# How sure the model must be (logit gap, top-1 minus top-2) for pre-positioning to decode a
# token of the answer ahead. Always exact: each such token is a draft that the request
# keeps only if it picks the same token, so this sets background work, not answers.
SURE_GAP = 2.0
BACKGROUND_CHUNK = 16  # tokens of idle-time work per model-thread turn
CONTINUATION_CAP = 32  # tokens of a predicted continuation
FORCED_CAP = 16  # tokens of a sure tail decoded past the exit

# The step loop: tokens one step's forward may hold (every running decode's token, then
# prefill chunks, then idle-time work). Measured on the 2-core CPU (README, "Concurrency": why 64).
CPU_STEP_TOKENS = 64
CUDA_STEP_TOKENS = 2048

# KV memory.
KV_BLOCK = 16  # tokens per KV pool block

# The own runner's kernels (headstart/model/runner.py says what each keeps bitwise). The
# defaults are batch invariant and the fastest on the CPU; "tiled" attention is also chunk
# invariant (a prompt prefilled in chunks gets the bits it gets at once) but runs slower
# (README, "The model layer alone").
ATTENTION = "sdpa"
LINEAR = "onednn"

# Sessions.
MAX_SESSIONS = 1000
IDLE_EXPIRY_S = 3600.0  # seconds before an idle session is deleted
MAX_PENDING = 1024  # waiting data entries per session; past it the oldest are dropped
MAX_QUERIES = 16  # registered questions per session
CONTEXT_RESERVE = 512  # tokens of context kept free for questions on streaming-data sessions
MIN_WINDOW = 128  # the smallest sliding window (tokens) a streaming-data session may ask for
QUERY_MAX_TOKENS = 8  # tokens of a registered question's answer kept, unless it asks for more (at most 32)

# The HTTP server.
HOST = "127.0.0.1"
PORT = 8000
TEMPERATURE = 1.0  # when a request names none (OpenAI's default)
MAX_BODY_BYTES = 4 * 1024 * 1024  # larger bodies get 413
HEARTBEAT_S = 15.0  # between SSE heartbeats on a quiet event stream

# Replicas on Ray Serve. Serve slots per replica: every open SSE stream (chat or /events)
# holds one for its whole life, so the slots are many and the engine's own admission (one
# request per session, the KV budget, the model thread's queue) bounds the compute.
REPLICA_CPUS = 1.0
REPLICA_GPUS = 0.0
MAX_ONGOING = 256
# Open /v1/sessions/{id}/events streams per server; one more gets 429. Below MAX_ONGOING, so a
# replica always keeps at least the difference (64 slots) for turns and other requests.
MAX_EVENT_STREAMS = 192
