"""The block prefix cache baseline: exact, block-granular, shared across sessions, LRU."""

from __future__ import annotations

from collections.abc import Callable

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from headstart.model.runner import Feed, from_backend
from headstart.session.prefix import PrefixCache
from headstart.session.session import Session
from headstart.session.template import ChatTemplate, common_prefix

PARAMS = SamplingParams(max_tokens=6)
SYSTEM = {"role": "system", "content": "You are a careful assistant for a shipping company. " * 6}


def test_a_follow_up_reuses_whole_blocks_and_equals_cold(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny, pre_position=False, gate=False, prefix_cache_blocks=256)
    cold = make_engine(tiny, pre_position=False, gate=False)
    template = ChatTemplate(tiny.tokenizer)
    first = [SYSTEM, {"role": "user", "content": "Where is parcel 1234?"}]
    a = engine.generate(Request(messages=first, params=PARAMS))
    assert a.path == "cold"
    second = [*first, {"role": "assistant", "content": a.text}, {"role": "user", "content": "And parcel 99?"}]
    b = engine.generate(Request(messages=second, params=PARAMS))
    held = template.render(first) + a.token_ids
    lcp = common_prefix(template.render(second), held)
    assert b.path == "prefix"
    assert b.cached_tokens == lcp // 16 * 16 > 0
    assert b.token_ids == cold.generate(Request(messages=second, params=PARAMS)).token_ids


def test_blocks_are_shared_across_sessions(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny, pre_position=False, gate=False, prefix_cache_blocks=256)
    template = ChatTemplate(tiny.tokenizer)
    one = [SYSTEM, {"role": "user", "content": "Track parcel 1."}]
    two = [SYSTEM, {"role": "user", "content": "Cancel order 77, please."}]
    engine.generate(Request(messages=one, params=PARAMS, session_id=None))
    c = engine.generate(Request(messages=two, params=PARAMS))
    shared = common_prefix(template.render(one), template.render(two))
    assert c.path == "prefix" and c.cached_tokens == shared // 16 * 16


def test_eviction_is_lru_and_keeps_the_blocks_others_hang_from(tiny: HFBackend) -> None:
    runner = from_backend(tiny, kv_budget=64 * 4 * tiny.info.kv_bytes_per_token, block_size=4)
    pool = runner.pool
    cache = PrefixCache(pool, capacity=3)
    ids = list(range(100, 122))  # 5 full blocks and 2 tokens
    s = Session("a", pool)
    runner.forward([Feed(s.kv, ids)])
    s.kv_background = bytearray(len(ids))
    assert cache.store(s) == 5
    assert len(cache) == 3 and cache.evicted == 2
    fresh = Session("b", pool)
    assert cache.attach(fresh, ids) == 12  # the first three blocks: a prefix is still usable
    assert fresh.kv_ids == ids[:12] and len(fresh.kv) == 12
    other = Session("c", pool)
    assert cache.attach(other, [1, 2, 3, 4, *ids]) == 0  # blocks match only at their position
