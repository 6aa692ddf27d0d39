"""hello's shared read (chatd.service.hellos): batched, exact per user, failures answered, stops
cleanly; and the batching under it (chatd.service.shared) weighing requests by size."""

from __future__ import annotations

import pytest
import trio

from chatd import errors
from chatd.service.hellos import HelloReads
from chatd.service.shared import SharedReads
from chatd.store import membership as ms
from chatd.store import reads
from chatd.store.writer import Writer


async def _group(pool, owner: str, members: list[str], client_id: str) -> int:
    writer = Writer(pool, max_batch=10, queue_size=10, publish=lambda events: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        result = await writer.run(ms.CreateGroup(user_id=owner, client_id=client_id, title="t", members=members))
        nursery.cancel_scope.cancel()
    return result["room"]["room_id"]


async def _read_all(hellos: HelloReads, user_ids: list[str]) -> list:
    out: list = [None] * len(user_ids)

    async def one(i: int, user_id: str) -> None:
        out[i] = await hellos.read(user_id)

    async with trio.open_nursery() as nursery:
        for i, user_id in enumerate(user_ids):
            nursery.start_soon(one, i, user_id)
    return out


async def test_hellos_at_once_share_reads_and_each_gets_its_own_rooms(pool):
    await pool.execute("INSERT INTO users (id) VALUES ('h-owner'), ('h-member'), ('h-off') ON CONFLICT DO NOTHING")
    await pool.execute("UPDATE users SET disabled = true WHERE id = 'h-off'")
    room = await _group(pool, "h-owner", ["h-member"], "h-create")
    new_users = [f"h-new-{i}" for i in range(60)]
    asked = [*new_users, "h-owner", "h-member", "h-member", "h-off"]
    hellos = HelloReads(pool, max_batch=16)
    async with trio.open_nursery() as nursery:
        await nursery.start(hellos.serve)
        with trio.fail_after(10):
            got = dict(zip(asked, await _read_all(hellos, asked)))
            results = await _read_all(hellos, ["h-member", "h-member"])
        nursery.cancel_scope.cancel()
    assert hellos.answered == len(asked) + 2 and hellos.statements < len(asked), "hellos were not shared"
    assert all(got[u] == (False, []) for u in new_users)
    assert got["h-off"][0] is True
    for user_id, role in (("h-owner", "owner"), ("h-member", "member")):
        disabled, rooms = got[user_id]
        assert not disabled and [(r["room_id"], r["role"]) for r in rooms] == [(room, role)]
    assert results[0] == results[1] and results[0][1][0] is not results[1][1][0], "the same user twice shares rows"
    rows = await pool.fetch("SELECT count(*) AS n FROM users WHERE id = ANY(%s)", (new_users,))
    assert rows[0]["n"] == len(new_users)


async def test_a_failed_read_answers_each_of_its_waiters_and_the_next_read_works(pool, monkeypatch):
    real = reads.hellos
    calls = []

    async def failing_once(pool_, user_ids):
        calls.append(list(user_ids))
        if len(calls) == 1:
            raise errors.Unavailable("database unreachable", retry_after=0.5)
        return await real(pool_, user_ids)

    monkeypatch.setattr(reads, "hellos", failing_once)
    hellos = HelloReads(pool)
    raised: list[BaseException] = []

    async def one(user_id: str) -> None:
        try:
            await hellos.read(user_id)
        except errors.Unavailable as exc:
            raised.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as readers:
                for user_id in ("h-f1", "h-f2", "h-f3"):
                    readers.start_soon(one, user_id)
                await trio.sleep(0.01)  # all three queued: they form the first read
                await nursery.start(hellos.serve)
            assert await hellos.read("h-f4") == (False, [])
            nursery.cancel_scope.cancel()
    assert calls == [["h-f1", "h-f2", "h-f3"], ["h-f4"]]
    assert len(raised) == 3 and len({id(exc) for exc in raised}) == 3, "each waiter raises its own error"
    assert all(exc.details["retry_after"] == 0.5 for exc in raised)


async def test_reads_after_the_service_stopped_fail_instead_of_hanging(pool):
    hellos = HelloReads(pool)
    async with trio.open_nursery() as nursery:
        await nursery.start(hellos.serve)
        nursery.cancel_scope.cancel()
    with trio.fail_after(2), pytest.raises(errors.Unavailable):
        await hellos.read("h-late")


async def test_a_bug_in_a_read_answers_internal_and_the_reads_go_on(pool, monkeypatch):
    real = reads.hellos
    calls = []

    async def forgetful_once(pool_, user_ids):
        calls.append(user_ids)
        return {} if len(calls) == 1 else await real(pool_, user_ids)  # a result missing its user

    monkeypatch.setattr(reads, "hellos", forgetful_once)
    hellos = HelloReads(pool)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hellos.serve)
            with pytest.raises(errors.Internal):
                await hellos.read("h-b1")
            assert await hellos.read("h-b2") == (False, [])
            nursery.cancel_scope.cancel()


async def test_a_heavy_request_starts_the_next_batch_instead_of_joining_a_full_one():
    # Requests weighed by size: a batch stops before one that would take it past the
    # budget, and that one leads the next batch (one huge request alone is still read).
    batches: list[list[str]] = []

    async def read_many(requests):
        batches.append(list(requests))
        return [len(r) for r in requests]

    shared = SharedReads(read_many, what="tests", weight=len, max_weight=10)
    asked = ["aaa", "bbb", "c" * 20, "dd", "ee", "ffffff"]
    got: dict[str, int] = {}

    async def one(request):
        got[request] = await shared.read(request)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as readers:
                for request in asked:
                    readers.start_soon(one, request)
                    await trio.sleep(0)  # queued in this order
                await trio.sleep(0.01)
                await nursery.start(shared.serve)
            nursery.cancel_scope.cancel()
    assert batches == [["aaa", "bbb"], ["c" * 20], ["dd", "ee", "ffffff"]]
    assert got == {r: len(r) for r in asked} and shared.statements == 3 and shared.answered == 6


async def test_a_full_queue_answers_busy_at_once_and_the_queued_are_read_later():
    async def read_many(requests):
        return list(requests)

    shared = SharedReads(read_many, what="tests", queue_size=2)
    got: list[str] = []

    async def one(request):
        got.append(await shared.read(request))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as readers:
                readers.start_soon(one, "a")
                readers.start_soon(one, "b")
                await trio.sleep(0.01)
                with pytest.raises(errors.Unavailable) as busy:
                    await shared.read("c")  # no room left in the queue
                assert busy.value.message == "server busy: too many tests waiting" and busy.value.details["retry_after"] == 1.0
                await nursery.start(shared.serve)
            nursery.cancel_scope.cancel()
    assert sorted(got) == ["a", "b"]
