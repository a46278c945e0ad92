"""Ready positions are forks of the session's KV: adopting, dropping or evicting one moves
block references only, and every answer stays equal to a cold computation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from headstart.engine.engine import Engine, Request
from headstart.kv.pool import SCRATCH
from headstart.model import HFBackend
from headstart.session.evict import Eviction
from tests.helpers import GREEDY, QUESTIONS, cold, converse, hint_next


def _references_add_up(engine: Engine) -> None:
    """Every block's reference count is the number of sequences holding it: nothing leaks."""
    held: Counter[int] = Counter()
    for s in engine.sessions.all():
        for seq in [s.kv, *(rp.seq for rp in s.ready.values())]:
            held.update(seq.blocks)
    pool = engine.pool
    assert all(pool.refs[b] == n for b, n in held.items())
    assert pool.used == len(held) == sum(1 for b, r in enumerate(pool.refs) if r and b != SCRATCH)


def _hinted(engine: Engine, sid: str, hint: str) -> tuple[list[dict[str, str]], object]:
    outs, prompts = converse(engine, sid, QUESTIONS[:1])
    s = hint_next(engine, sid, hint)
    return [*prompts[0], {"role": "assistant", "content": outs[0].text}, {"role": "user", "content": QUESTIONS[1]}], s


def test_ready_exact_adopts_the_fork_without_a_copy(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, gate=False)
    messages, s = _hinted(engine, "adopt", QUESTIONS[1])
    rp = s.ready["next"]
    blocks = list(rp.seq.blocks)
    assert s.kv.blocks == blocks[: len(s.kv.blocks)]  # the position shares the session's blocks
    used = engine.pool.used
    # an ephemeral ask decodes on a fork and leaves the position intact
    ask = engine.generate(Request(messages=messages, params=GREEDY, session_id="adopt", ephemeral=True))
    assert ask.path == "ready_exact" and s.ready["next"] is rp and rp.seq.blocks == blocks
    assert engine.wait_idle(300)
    _references_add_up(engine)
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="adopt"))
    assert c.path == "ready_exact" and c.extra["forwards_before_first_token"] == 0
    assert s.kv.blocks[: len(blocks) - 1] == blocks[:-1]  # adopted: the same blocks, not copies
    assert c.token_ids == ask.token_ids == cold(engine, messages).token_ids
    assert engine.wait_idle(300)
    _references_add_up(engine)
    assert engine.pool.used >= used - len(blocks)


def test_a_missed_position_is_dropped_and_the_answer_is_exact(real: HFBackend,
                                                              make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, gate=False)
    messages, s = _hinted(engine, "miss", "Something else entirely, about cooking pasta.")
    rp = s.ready["next"]
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="miss"))
    assert c.path == "entry"
    assert c.token_ids == cold(engine, messages).token_ids
    assert engine.wait_idle(300)  # the next pre-positioning replaces the missed position
    assert s.ready["next"] is not rp and rp.seq.blocks == []  # dropped: its blocks went back
    _references_add_up(engine)


def test_an_evicted_position_frees_its_blocks_and_the_answer_is_exact(real: HFBackend,
                                                                      make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, gate=False)
    messages, s = _hinted(engine, "evict", QUESTIONS[1])
    rp = s.ready["next"]
    own = len(set(rp.seq.blocks) - set(s.kv.blocks))  # blocks only the position holds
    freed = own * engine.pool.block_bytes + rp.charge  # and the bytes its logits took
    used, resident = engine.pool.used, engine.sessions.resident_bytes()
    engine.sessions.evict(Eviction(s, "ready"))
    assert not s.ready and rp.seq.blocks == [] and engine.pool.used == used - own
    assert engine.sessions.resident_bytes() == resident - freed
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="evict"))
    assert c.path == "entry"
    assert c.token_ids == cold(engine, messages).token_ids
    assert engine.wait_idle(300)
    _references_add_up(engine)



def test_the_engine_figures_warmed_turn_is_a_ready_exact_hit_equal_to_cold(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    """bench --model-only's setup (a 1,000-token session, the hint named right after the
    turn, ephemeral asks): the hinted turn is a ready_exact hit with no forward before its
    first token and the cold answer; the other, streamed, is the gate's."""
    from headstart.bench.model_only import warmed_turns
    from headstart.decode.sampling import SamplingParams

    engine = make_engine(real, gate=True, gap_threshold=float("inf"))
    turns = warmed_turns(engine, 1000, rounds=1, tokens=6)
    assert [c.path for _, c in turns] == ["ready_exact", "gate"]
    assert turns[0][1].prompt_tokens >= 950
    for messages, c in turns[::2]:
        assert c.extra["forwards_before_first_token"] == 0
        assert c.token_ids == cold(engine, messages, SamplingParams(max_tokens=6)).token_ids


def test_a_hint_named_as_the_idle_job_ends_is_still_pre_positioned(
    tiny: HFBackend, make_engine: Callable[..., Engine], monkeypatch
) -> None:
    """The idle job decides it has nothing left to pre-position, and before it says so a
    client names its next message (which finds the job still queued and queues none): the
    job must take it up rather than end and leave the hint without a position."""
    from headstart.idle import job

    engine = make_engine(tiny)
    converse(engine, "late", QUESTIONS[:1])
    s = engine.get_session("late")
    decide = job._needs_prepos
    raced: list[bool] = []

    def needs_then_hint(idle, session):  # type: ignore[no-untyped-def]
        answer = decide(idle, session)
        if not answer and not raced:  # the client's thread, between this check and the job's end
            raced.append(True)
            session.settings.hint = QUESTIONS[1]
            engine.schedule_pre_position(session)
        return answer

    monkeypatch.setattr(job, "_needs_prepos", needs_then_hint)
    engine.schedule_upkeep(s)  # a job that finds the position up to date
    assert engine.wait_idle(300) and raced
    assert s.positioned_epoch == s.prepos_epoch and s.ready["next"].source == "hint"
