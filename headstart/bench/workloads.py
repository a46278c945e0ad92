"""Benchmark traffic, generated from a seed: sessions of requests with idle gaps between them.

A workload is a list of session scripts. A script says what each request adds to the
conversation (its delta: a task, a tool result, new data and a question, a user message)
and how long the client is idle before sending it; the assistant's answers are whatever
the model says, so a script fixes the traffic without fixing the outputs. Nothing is
downloaded: the text comes from small built-in vocabularies and ``random.Random`` seeded
by the workload's seed (and the session's index), so the same seed gives the same
workload on every machine, and the gaps are drawn from a separate stream so that
changing the gap setting leaves the content as it was.

Three kinds:

- ``agent``: a coding agent loop. A system prompt with tool schemas, a task, then turns
  of (model answer, tool result); the tool results are the deltas, so contexts grow past
  1,000 tokens within the first eight turns.
- ``stream``: a monitoring session. Sensor readings arrive as ``DATA`` messages between
  questions, and one recurring yes/no question is asked with ``fast_answer`` candidates,
  sometimes right after new data, sometimes not. A rule over the data gives the right
  answer, so correctness can be reported beside the gate's self-agreement.
- ``chat``: a multi-turn chat with a user's think time between turns.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

Message = dict[str, Any]

WORKLOADS = ("agent", "stream", "chat")


# -- gaps ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GapSpec:
    """How long a client is idle before each request, and whether "long" is guaranteed.

    ``settle`` models a gap *long enough for pre-positioning to finish*: after sleeping
    the drawn gap the client also waits until its own session has no request in flight and
    no idle-time work left. That makes the long-gap setting mean the same thing on a fast
    and a slow machine; the time it adds is measured and reported. Without it the gap is
    only the drawn sleep, and work still running when the request arrives is cancelled.
    """

    dist: str = "uniform"
    a: float = 2.0
    b: float = 5.0
    settle: bool = True

    def draw(self, rng: random.Random) -> float:
        if self.dist == "fixed":
            return self.a
        if self.dist == "uniform":
            return rng.uniform(self.a, self.b)
        if self.dist == "exp":
            return min(rng.expovariate(1.0 / self.a), 10 * self.a)
        if self.dist == "lognormal":
            return rng.lognormvariate(0.0, self.b) * self.a
        raise ValueError(f"unknown gap distribution {self.dist!r}")

    def describe(self) -> str:
        text = {
            "fixed": f"fixed {self.a:g} s",
            "uniform": f"uniform {self.a:g}-{self.b:g} s",
            "exp": f"exponential, mean {self.a:g} s",
            "lognormal": f"lognormal, median {self.a:g} s, sigma {self.b:g}",
        }[self.dist]
        return text + (" + wait for the session's idle-time work" if self.settle else "")


GAP_PRESETS = {
    # Long enough: a few seconds of think time or tool latency, then whatever it takes.
    "long": GapSpec("uniform", 2.0, 5.0, settle=True),
    # Too short for pre-positioning to finish: the request cancels the work in flight.
    "short": GapSpec("uniform", 0.05, 0.3, settle=False),
    "quick": GapSpec("uniform", 0.2, 0.6, settle=True),
}


def parse_gaps(spec: str) -> GapSpec:
    """``long`` | ``short`` | ``quick`` | ``fixed:S`` | ``uniform:A:B`` | ``exp:MEAN`` |
    ``lognormal:MEDIAN:SIGMA``, with an optional ``+settle`` or ``-settle`` suffix."""
    settle: bool | None = None
    for suffix, value in (("+settle", True), ("-settle", False)):
        if spec.endswith(suffix):
            spec, settle = spec[: -len(suffix)], value
    if spec in GAP_PRESETS:
        gap = GAP_PRESETS[spec]
    else:
        name, *nums = spec.split(":")
        try:
            values = [float(n) for n in nums]
        except ValueError:
            raise ValueError(f"bad gap spec {spec!r}") from None
        need = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}.get(name)
        if need is None or len(values) != need or any(v < 0 for v in values):
            raise ValueError(f"bad gap spec {spec!r}: try long, short, fixed:1, uniform:2:5, exp:3, lognormal:2:0.5")
        gap = GapSpec(name, values[0], values[1] if need == 2 else 0.0, settle=False)
    return replace(gap, settle=gap.settle if settle is None else settle)


# -- scripts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One request: the messages it adds, the idle time before it, how to answer."""

    messages: tuple[Message, ...]
    gap_s: float
    max_tokens: int
    kind: str = "turn"
    fast_answer: tuple[str, ...] | None = None
    truth: str | None = None  # the right answer, where a rule over the data gives one


@dataclass(frozen=True)
class Script:
    """One session's requests, in order. ``query`` is a recurring question the client
    would register with the server (the ready position then targets it)."""

    id: str
    system: str | None
    steps: tuple[Step, ...]
    query: str | None = None
    tools: tuple[dict[str, Any], ...] | None = None  # sent as the request's `tools` (OpenAI form)


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    sessions: tuple[Script, ...]
    gaps: GapSpec = field(default_factory=GapSpec)

    @property
    def requests(self) -> int:
        return sum(len(s.steps) for s in self.sessions)

    def split(self, rounds: int) -> list[Workload]:
        """The sessions in ``rounds`` consecutive groups (a benchmark runs every mode on one
        group before the next, so slow spells of a shared machine hit all modes alike)."""
        rounds = max(1, min(rounds, len(self.sessions)))
        size = -(-len(self.sessions) // rounds)
        return [replace(self, sessions=self.sessions[i : i + size]) for i in range(0, len(self.sessions), size)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "sessions": len(self.sessions),
            "requests": self.requests,
            "gaps": self.gaps.describe(),
        }

    def to_jsonl(self, path: str | Path) -> None:
        """One session per line (the trace format ``headstart calibrate --trace`` reads)."""
        with open(path, "w") as f:
            for s in self.sessions:
                f.write(json.dumps({"workload": self.name, **asdict(s)}) + "\n")


def load_trace(path: str | Path, gaps: GapSpec | None = None) -> Workload:
    """A workload from a JSONL trace: one session per line, ``{"id", "system", "query",
    "steps": [{"messages": [...], "gap_s", "max_tokens", "fast_answer"?, "truth"?}]}``."""
    sessions = []
    name = "trace"
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            steps = tuple(
                Step(
                    messages=tuple(st["messages"]),
                    gap_s=float(st.get("gap_s", 0.0)),
                    max_tokens=int(st.get("max_tokens", 24)),
                    kind=st.get("kind", "turn"),
                    fast_answer=tuple(st["fast_answer"]) if st.get("fast_answer") else None,
                    truth=st.get("truth"),
                )
                for st in raw["steps"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a session line ({exc})") from None
        name = raw.get("workload", name)
        tools = tuple(raw["tools"]) if raw.get("tools") else None
        sessions.append(Script(str(raw.get("id", f"s{n}")), raw.get("system"), steps, raw.get("query"), tools))
    if not sessions:
        raise ValueError(f"{path}: no sessions")
    return Workload(name, 0, tuple(sessions), gaps or GapSpec("fixed", 0.0, 0.0, settle=True))


# -- shared vocabulary -----------------------------------------------------------------

_WORDS = (
    "cache", "config", "parser", "router", "token", "buffer", "worker", "queue", "stream", "index", "schema",
    "client", "server", "session", "budget", "window", "record", "metric", "sample", "report", "loader",
    "writer", "reader", "filter", "batch", "engine", "handle", "state", "limit", "retry", "policy", "bucket",
    "ledger", "invoice", "order", "cart", "user", "account", "price", "rate", "quota", "event", "signal",
    "timer", "clock", "shard", "replica",
)
_MODULES = ("billing", "ingest", "auth", "search", "export", "scheduler", "storage", "notify")
_ERRORS = (
    ("KeyError", "'{w}'"),
    ("AssertionError", "expected {n} == {m}"),
    ("TypeError", "unsupported operand type(s) for +: 'int' and 'NoneType'"),
    ("ValueError", "invalid literal for int() with base 10: '{w}'"),
    ("AttributeError", "'NoneType' object has no attribute '{w}'"),
    ("ZeroDivisionError", "division by zero"),
)


def _ident(rng: random.Random) -> str:
    return "_".join(rng.sample(_WORDS, 2))


class _Gaps:
    """A session's gaps: their own random stream, so the gap setting never changes content."""

    def __init__(self, seed: int, name: str, index: int, spec: GapSpec) -> None:
        self.rng = random.Random(f"gaps:{name}:{seed}:{index}")
        self.spec = spec

    def next(self) -> float:
        return round(self.spec.draw(self.rng), 3)


# -- agent -----------------------------------------------------------------------------

_TOOLS: list[dict[str, Any]] = [
    {"name": "list_dir", "description": "List the files in a directory of the repository.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "directory"}},
                    "required": ["path"]}},
    {"name": "search", "description": "Search the repository for a regular expression; returns matching lines.",
     "parameters": {"type": "object", "properties": {"pattern": {"type": "string"},
                                                     "glob": {"type": "string", "description": "files to search"}},
                    "required": ["pattern"]}},
    {"name": "read_file", "description": "Read lines of a file.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "start": {"type": "integer"},
                                                     "end": {"type": "integer"}}, "required": ["path"]}},
    {"name": "edit_file", "description": "Replace an exact snippet of a file with new text.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "old": {"type": "string"},
                                                     "new": {"type": "string"}},
                    "required": ["path", "old", "new"]}},
    {"name": "run_tests", "description": "Run pytest on a file or test id and return the summary.",
     "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}},
    {"name": "finish", "description": "Stop and report what was changed and why.",
     "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}},
]

_AGENT_SYSTEM = (
    "You are CodeFix, an autonomous software engineering agent working in the Python repository "
    "`{repo}`. You solve the user's task step by step by calling tools; you cannot see the "
    "repository except through them.\n\nTools (JSON schema):\n{tools}\n\n"
    "Rules:\n- Answer with exactly one tool call per message, written as a JSON object "
    '{{"name": <tool name>, "arguments": {{...}}}} and nothing else.\n'
    "- After each call the tool's output is sent back to you as a message from the tool.\n"
    "- Read the code before editing it, and run the failing test after every edit.\n"
    "- Keep edits minimal. Call finish when the test passes."
)


_AGENT_SYSTEM_TOOLS = (
    "You are CodeFix, an autonomous software engineering agent working in the Python repository "
    "`{repo}`. You solve the user's task step by step by calling the tools you are given; you "
    "cannot see the repository except through them. Call exactly one tool per message. Read the "
    "code before editing it, run the failing test after every edit, keep edits minimal, and "
    "call finish when the test passes."
)


def _code_lines(rng: random.Random, n: int) -> list[str]:
    lines = []
    fn = _ident(rng)
    lines.append(f"def {fn}({_ident(rng)}, {rng.choice(_WORDS)}=None):")
    for _ in range(n - 1):
        a, b = _ident(rng), rng.choice(_WORDS)
        pattern = rng.randrange(5)
        if pattern == 0:
            lines.append(f"    {a} = {b}.get('{rng.choice(_WORDS)}', {rng.randrange(100)})")
        elif pattern == 1:
            lines.append(f"    if {a} is None or {a} > {rng.randrange(1, 500)}:")
        elif pattern == 2:
            lines.append(f"        return {b}.{rng.choice(_WORDS)}({a})")
        elif pattern == 3:
            lines.append(f"    for {rng.choice(_WORDS)} in {a}.{rng.choice(_WORDS)}s:")
        else:
            lines.append(f"    {a} += {b}.{rng.choice(_WORDS)} * {rng.randrange(2, 9)}")
    return lines


def _tool_result(rng: random.Random, turn: int, module: str, test: str) -> str:
    kind = ("list_dir", "search", "read_file", "run_tests", "read_file", "edit_file", "run_tests")[turn % 7]
    if kind == "list_dir":
        files = sorted({f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}.py" for _ in range(7)})
        body = "\n".join(f"{module}/{f}  {rng.randrange(1, 40)} KB" for f in files)
        return f"list_dir {module}/ -> {len(files)} entries\n{body}"
    if kind == "search":
        hits = [
            f"{module}/{rng.choice(_WORDS)}.py:{rng.randrange(10, 400)}:    {line.strip()}"
            for line in _code_lines(rng, 6)
        ]
        return "search -> 6 matches\n" + "\n".join(hits)
    if kind == "read_file":
        start = rng.randrange(1, 300)
        lines = _code_lines(rng, 9)
        body = "\n".join(f"{start + i:4d}  {line}" for i, line in enumerate(lines))
        return f"read_file {module}/{rng.choice(_WORDS)}.py lines {start}-{start + 8}\n{body}"
    if kind == "edit_file":
        return (
            f"edit_file {module}/{rng.choice(_WORDS)}.py: 1 replacement, "
            f"{rng.randrange(1, 4)} lines changed\n" + "\n".join(_code_lines(rng, 5))
        )
    passed, failed = rng.randrange(5, 60), rng.randrange(0, 3)
    err, msg = rng.choice(_ERRORS)
    msg = msg.format(w=rng.choice(_WORDS), n=rng.randrange(10), m=rng.randrange(10, 20))
    trace = "\n".join(f"{module}/{rng.choice(_WORDS)}.py:{rng.randrange(10, 400)}: in {_ident(rng)}" for _ in range(4))
    return (
        f"run_tests {test}\n{'F' * failed}{'.' * min(passed, 30)}\n{trace}\nE   {err}: {msg}\n"
        f"{failed} failed, {passed} passed in {rng.uniform(0.2, 9):.2f}s"
    )


def agent_script(
    seed: int, index: int, turns: int, max_tokens: int, gaps: GapSpec, real_tools: bool = False
) -> Script:
    """An agent session. With ``real_tools`` (a model whose template renders tools) the
    schemas go in the request's ``tools`` and the model answers with real tool calls;
    otherwise they are written into the system prompt, as one does for such a model."""
    rng = random.Random(f"agent:{seed}:{index}")
    gr = _Gaps(seed, "agent", index, gaps)
    repo = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
    module = rng.choice(_MODULES)
    test = f"tests/test_{module}.py::test_{_ident(rng)}"
    err, msg = rng.choice(_ERRORS)
    msg = msg.format(w=rng.choice(_WORDS), n=rng.randrange(10), m=rng.randrange(10, 20))
    schemas = rng.sample(_TOOLS, len(_TOOLS))
    if real_tools:
        system = _AGENT_SYSTEM_TOOLS.format(repo=repo)
        tools: tuple[dict[str, Any], ...] | None = tuple({"type": "function", "function": t} for t in schemas)
    else:
        system = _AGENT_SYSTEM.format(repo=repo, tools="\n".join(json.dumps(t) for t in schemas))
        tools = None
    task = (
        f"Task: the test `{test}` fails with `{err}: {msg}` since the last change to the "
        f"`{module}` package. Find the cause and fix it without breaking the other tests."
    )
    steps = [Step(({"role": "user", "content": task},), gr.next(), max_tokens, kind="task")]
    for turn in range(turns - 1):
        steps.append(
            Step(
                ({"role": "tool", "tool_call_id": f"call_{turn}", "content": _tool_result(rng, turn, module, test)},),
                gr.next(),
                max_tokens,
                "tool",
            )
        )
    return Script(f"agent-{seed}-{index}", system, tuple(steps), tools=tools)


# -- stream ----------------------------------------------------------------------------

_STREAM_SYSTEM = (
    "You are a monitoring assistant for the cooling system of server rack {rack}. Messages "
    "that start with DATA are sensor readings, oldest first; they need no reply of their own. "
    "When a message starts with QUESTION, answer it from the readings with one word: Yes or No."
)
STREAM_CANDIDATES = ("Yes", "No")


def stream_rule(readings: list[float], limit: float) -> str:
    """The right answer to the recurring question: is the latest inlet reading above the limit?"""
    return "Yes" if readings and readings[-1] > limit else "No"


def stream_script(seed: int, index: int, questions: int, gaps: GapSpec, p_new_data: float = 0.6) -> Script:
    rng = random.Random(f"stream:{seed}:{index}")
    gr = _Gaps(seed, "stream", index, gaps)
    rack = f"{rng.choice('ABCDEFGH')}{rng.randrange(1, 40)}"
    limit = rng.choice((27.0, 28.5, 30.0, 31.5))
    question = f"QUESTION: is the latest inlet temperature above {limit:.1f} C? Answer Yes or No."
    temp = limit + rng.uniform(-2.0, 2.0)
    clock = rng.randrange(0, 20 * 3600)
    readings: list[float] = []

    def reading() -> Message:
        nonlocal temp, clock
        temp += rng.gauss(0.0, 1.2) + (limit - temp) * 0.15
        clock += rng.randrange(5, 90)
        readings.append(round(temp, 1))
        h, m, s = clock // 3600 % 24, clock // 60 % 60, clock % 60
        fan = int(2400 + (temp - 20) * 180 + rng.randrange(-150, 150))
        return {
            "role": "user",
            "content": f"DATA {h:02d}:{m:02d}:{s:02d} rack={rack} inlet={temp:.1f}C "
            f"outlet={temp + rng.uniform(6, 11):.1f}C fan={fan}rpm",
        }

    steps = []
    for q in range(questions):
        if q == 0:
            fresh = [reading() for _ in range(6)]
        elif rng.random() < p_new_data:
            fresh = [reading() for _ in range(rng.randrange(1, 4))]
        else:
            fresh = []
        kind = "question+data" if fresh else "question"
        msgs = (*fresh, {"role": "user", "content": question})
        steps.append(
            Step(msgs, gr.next(), 1, kind, fast_answer=STREAM_CANDIDATES, truth=stream_rule(readings, limit))
        )
    system = _STREAM_SYSTEM.format(rack=rack)
    return Script(f"stream-{seed}-{index}", system, tuple(steps), query=question)


# -- chat ------------------------------------------------------------------------------

_TOPICS = {
    "cooking": ["How do I make a simple tomato sauce?", "Can I freeze it?", "What pasta goes best with it?",
                "How long does it keep in the fridge?", "Any way to make it spicier?", "What wine would you pair?"],
    "travel": ["What should I see in Lisbon in two days?", "Which neighbourhood is best to stay in?",
               "How do I get there from the airport?", "Is it expensive to eat out?", "What is a typical dish?",
               "Any day trips you recommend?"],
    "science": ["Why is the sky blue?", "Then why are sunsets red?", "Does the same happen on Mars?",
                "What colour is the sky on the Moon?", "Who first explained this?", "Can you summarise it simply?"],
    "fitness": ["How should a beginner start running?", "How many times a week?", "What shoes do I need?",
                "Should I stretch before or after?", "How do I avoid knee pain?", "When can I try a 10k race?"],
    "python": ["What is a list comprehension in Python?", "Can you show an example with a condition?",
               "Is it faster than a for loop?", "What about dictionary comprehensions?",
               "When should I avoid them?", "What is a generator expression then?"],
    "history": ["Who built the pyramids of Giza?", "How long did it take?", "How were the stones moved?",
                "Why were they built?", "Which one is the largest?", "Can tourists go inside?"],
}
_OPENERS = ("", "Quick question: ", "Hi! ", "I was wondering: ", "Hello. ")


def chat_script(seed: int, index: int, turns: int, max_tokens: int, gaps: GapSpec) -> Script:
    rng = random.Random(f"chat:{seed}:{index}")
    gr = _Gaps(seed, "chat", index, gaps)
    topic = rng.choice(sorted(_TOPICS))
    questions = _TOPICS[topic]
    steps = []
    for t in range(turns):
        text = questions[t % len(questions)]
        if t == 0:
            text = rng.choice(_OPENERS) + text
        elif rng.random() < 0.3:
            text = rng.choice(("Thanks. ", "Interesting. ", "OK. ", "Got it. ")) + text
        steps.append(Step(({"role": "user", "content": text},), gr.next(), max_tokens, "chat"))
    system = "You are a friendly assistant. Answer briefly and clearly."
    return Script(f"chat-{seed}-{index}", system, tuple(steps))


# -- the entry point -------------------------------------------------------------------

TOOL_CALL_TOKENS = 48  # a whole JSON call of these tools; a call cut short is plain content

# (sessions, turns, max_tokens) for the full and the quick setting
SIZES = {
    "agent": {"full": (4, 9, 16), "quick": (2, 3, 8)},
    "stream": {"full": (4, 12, 1), "quick": (2, 4, 1)},
    "chat": {"full": (4, 6, 32), "quick": (2, 3, 8)},
}


def make_workload(
    name: str,
    *,
    seed: int = 0,
    quick: bool = False,
    sessions: int | None = None,
    turns: int | None = None,
    max_tokens: int | None = None,
    gaps: GapSpec | str | None = None,
    real_tools: bool = False,
) -> Workload:
    """The named workload; ``quick`` shrinks it to a smoke test, the others override sizes.
    ``real_tools``: the agent sends ``tools`` and its answers need room for a whole call."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}")
    n, t, mt = SIZES[name]["quick" if quick else "full"]
    if name == "agent" and real_tools:
        mt = max(mt, TOOL_CALL_TOKENS)
    n, t, mt = sessions or n, turns or t, max_tokens or mt
    if n < 1 or t < 1 or mt < 1:
        raise ValueError("sessions, turns and max_tokens must be positive")
    if gaps is None:
        gaps = "quick" if quick else "long"
    gap = parse_gaps(gaps) if isinstance(gaps, str) else gaps
    if name == "agent":
        scripts = [agent_script(seed, i, t, mt, gap, real_tools) for i in range(n)]
    elif name == "stream":
        scripts = [stream_script(seed, i, t, gap) for i in range(n)]
    else:
        scripts = [chat_script(seed, i, t, mt, gap) for i in range(n)]
    return Workload(name, seed, tuple(scripts), gap)
