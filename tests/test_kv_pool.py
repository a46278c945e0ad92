"""The paged KV pool: forks, crops, adoption and copy on write are bookkeeping, and the
free-block count is the budget."""

from __future__ import annotations

import pytest
import torch

from headstart.kv import BlockPool, KVSeq, NoBlocks


def _pool(blocks: int = 8, block_size: int = 4) -> BlockPool:
    per_block = 2 * 2 * 1 * 2 * 4 * block_size  # 2 layers, 1 kv head, head_dim 2, fp32
    return BlockPool(2, 1, 2, block_size=block_size, budget_bytes=blocks * per_block)


def _write(pool: BlockPool, seq: KVSeq, start: int, value: float) -> None:
    """Fill the rows ``start..`` of ``seq`` with ``value`` + position in every layer."""
    for p, slot in enumerate(seq.slots(start, len(seq) - start), start):
        for t in (*pool.k, *pool.v):
            t.view(-1, 1, 2)[slot] = value + p


def _rows(pool: BlockPool, seq: KVSeq) -> torch.Tensor:
    return pool.read(seq.blocks, len(seq))[0][0][:, 0, 0]


def test_fork_shares_blocks_and_crop_gives_whole_blocks_back() -> None:
    pool = _pool()
    a = KVSeq(pool)
    a.append(list(range(10)))  # 3 blocks of 4
    assert pool.used == 3 and pool.available() == 5
    b = a.fork()
    assert b.blocks == a.blocks and pool.used == 3  # no copy
    assert all(pool.refs[x] == 2 for x in a.blocks)
    a.crop(5)
    assert len(a.blocks) == 2 and pool.used == 3  # b still holds the third block
    b.release()
    assert pool.used == 2 and pool.available() == 6
    a.crop(0)
    assert pool.used == 0 and a.blocks == [] and pool.available() == 8


def test_copy_on_write_copies_only_the_shared_partial_block() -> None:
    pool = _pool()
    a = KVSeq(pool)
    a.append(list(range(6)))  # one full block, one with 2 of 4 rows
    _write(pool, a, 0, 100.0)
    position = a.fork()
    a.crop(6)
    before = list(a.blocks)
    assert a.blocks_needed(1) == 1  # the shared tail is copied first
    start = a.append([50])
    _write(pool, a, start, 500.0)
    assert a.blocks[0] == before[0] and a.blocks[1] != before[1]  # full block still shared
    assert pool.refs[before[0]] == 2 and pool.refs[before[1]] == 1
    assert _rows(pool, a).tolist() == [100, 101, 102, 103, 104, 105, 506]  # copied rows kept
    assert _rows(pool, position).tolist() == [100, 101, 102, 103, 104, 105]  # the fork untouched
    # appending to a block nobody else holds copies nothing
    blocks = list(a.blocks)
    a.append([51])
    assert a.blocks == blocks


def test_adopt_moves_the_table() -> None:
    pool = _pool()
    session = KVSeq(pool)
    session.append(list(range(5)))
    position = session.fork()
    position.append([7, 8, 9, 10])  # copy on write of block 2, then a new block
    session.crop(4)
    used = pool.used
    session.adopt(position)
    assert session.ids == [0, 1, 2, 3, 4, 7, 8, 9, 10] and position.blocks == [] and len(position) == 0
    assert pool.used == used  # nothing allocated or freed beyond the old tail
    assert all(pool.refs[b] == 1 for b in session.blocks)


def test_adopt_fork_counts_like_adopting_a_fork() -> None:
    """``adopt_fork`` touches only the blocks past those the two share, and leaves every count,
    the free list and the rows as ``adopt(other.fork())`` does."""
    results = []
    for fast in (False, True):
        pool = _pool(blocks=12)
        session = KVSeq(pool)
        session.append(list(range(9)))  # blocks of 4: two full, one with 1 row
        _write(pool, session, 0, 100.0)
        position = session.fork()
        position.append([20, 21, 22, 23, 24])  # copy on write of the third block, then a new one
        _write(pool, position, 9, 200.0)
        session.crop(6)  # a session cut inside the second block: a partial, shared tail
        if fast:
            session.adopt_fork(position)
        else:
            session.adopt(position.fork())
        results.append((list(session.blocks), list(session.ids), list(pool.refs), sorted(pool._free), pool.used,
                        _rows(pool, session).tolist()))
        assert session.ids == position.ids and session.blocks == position.blocks
        position.release()
        session.release()
        assert pool.used == 0 and pool.available() == 12
    assert results[0] == results[1]


def test_shares_rows_holds_until_a_write_before_the_length() -> None:
    pool = _pool(blocks=12)
    session = KVSeq(pool)
    session.append(list(range(10)))
    position = session.fork()
    position.append([50, 51])
    session.crop(6)
    assert session.shares_rows(position, 6) and not session.shares_rows(position, 7)  # 7: past the session
    session.append([6, 7])  # the same ids, written again into a copy of the shared block
    assert not session.shares_rows(position, 6) and session.ids[:6] == position.ids[:6]
    other = position.fork()
    other.crop(4)
    other.append([9])  # a whole shared block, then a row in a fresh one
    assert other.shares_rows(position, 4) and not other.shares_rows(position, 5)


def test_the_budget_is_the_free_block_count_with_reservations() -> None:
    pool = _pool(blocks=4)
    r = pool.reserve(3)
    assert pool.available() == 1
    idle = KVSeq(pool)
    idle.append([1, 2, 3, 4])  # takes the one unreserved block
    with pytest.raises(NoBlocks):
        idle.append([5])
    req = KVSeq(pool)
    req.append(list(range(12)), r)  # drawn from the reservation
    assert r.left == 0 and pool.reserved == 0 and pool.used == 4
    with pytest.raises(NoBlocks):
        req.append([1], r)
    req.release()
    idle.release()
    assert pool.used == 0 and pool.available() == 4
    r2 = pool.reserve(2)
    r2.release()
    assert pool.reserved == 0 and pool.available() == 4


def test_charges_count_against_the_budget_and_peak() -> None:
    pool = _pool(blocks=4)
    charged = pool.charge(pool.block_bytes + 1)
    assert pool.available() == 2 and pool.peak == pool.resident_bytes() == pool.block_bytes + 1
    pool.uncharge(charged)
    assert pool.available() == 4 and pool.resident_bytes() == 0


def test_read_write_round_trip_is_bitwise() -> None:
    pool = _pool()
    a = KVSeq(pool)
    a.append(list(range(7)))
    for t in (*pool.k, *pool.v):
        t.normal_()
    rows = pool.read(a.blocks, 7)
    b = KVSeq(pool)
    b.append(list(range(7)))
    pool.write(b.blocks, rows)
    again = pool.read(b.blocks, 7)
    assert all(torch.equal(x, y) and torch.equal(u, w) for (x, u), (y, w) in zip(rows, again, strict=True))


def test_a_dropped_sequence_gives_its_blocks_back() -> None:
    pool = _pool()
    a = KVSeq(pool)
    a.append(list(range(9)))
    assert pool.used == 3
    del a
    assert pool.used == 0


@pytest.mark.parametrize("paged", [False, True])
def test_rows_put_come_back_in_either_layout(paged: bool) -> None:
    """The head-major layout (the CPU kernels') and the paged one (CUDA's flash kernel) hold
    the same rows: a run of consecutive blocks reads as a view, any table as a gather."""
    pool = BlockPool(2, 3, 4, block_size=4, budget_bytes=1 << 20, paged=paged)
    a = KVSeq(pool)
    a.append(list(range(10)))
    assert a.blocks == list(range(a.blocks[0], a.blocks[0] + 3))  # consecutive: a view
    k, v = torch.randn(10, 3, 4), torch.randn(10, 3, 4)
    slots = torch.tensor(a.slots(0, 10))
    pool.put(1, slots, k, v)
    run = pool.heads(pool.k[1], (a.blocks[0], 3), 10)
    assert run.untyped_storage().data_ptr() == pool.k[1].untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(run, k.transpose(0, 1))
    assert torch.equal(pool.heads(pool.v[1], torch.tensor(a.blocks), 10), v.transpose(0, 1))
    layer1 = pool.read(a.blocks, 10)[1]
    assert torch.equal(layer1[0], k) and torch.equal(layer1[1], v)
    fork = a.fork()
    a.append([10])  # copy on write of the shared last block: its two used rows move along
    assert a.blocks[-1] != fork.blocks[-1]
    assert torch.equal(pool.read(a.blocks, 10)[1][0], k)
