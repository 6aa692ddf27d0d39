"""The group-commit writer: durable before ack, gapless seqs, idempotency."""

import contextlib
import json

import trio

from chatd import errors
from chatd.store import membership as ms
from chatd.store import mutations as mu
from chatd.store.pool import open_pool
from chatd.store.writer import Writer


async def _setup_room(pool, owner="alice", members=("bob",), client_id="create-1"):
    await pool.execute("INSERT INTO users (id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", ([owner, *members, "mallory"],))
    published = []
    writer = Writer(pool, max_batch=500, queue_size=10000, publish=published.extend)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        result = await writer.run(ms.CreateGroup(user_id=owner, client_id=client_id, title="t", members=list(members)))
        nursery.cancel_scope.cancel()
    return result["room"]["room_id"]


async def _run_writer(pool, work, published=None, **options):
    published = [] if published is None else published
    writer = Writer(pool, publish=published.extend, **{"max_batch": 500, "queue_size": 10000, **options})
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        result = await work(writer)
        nursery.cancel_scope.cancel()
    return result, published


async def test_many_concurrent_sends_share_batches_and_get_gapless_seqs(pool):
    room = await _setup_room(pool)
    acks = []

    async def work(writer):
        async def one(i):
            acks.append(await writer.run(mu.Send(user_id="alice" if i % 2 else "bob", client_id=f"m{i}", room_id=room, body=f"hi {i}")))

        async with trio.open_nursery() as n:
            for i in range(300):
                n.start_soon(one, i)
        return writer.batches

    with trio.fail_after(30):
        batches, published = await _run_writer(pool, work)
    seqs = sorted(a["seq"] for a in acks)
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    assert batches < 300, "sends were not grouped into shared transactions"
    # Everything acked is committed, and the published events are in seq order.
    rows = await pool.fetch("SELECT seq FROM events WHERE room_id = %s AND kind = 'message' ORDER BY seq", (room,))
    assert [r["seq"] for r in rows] == seqs
    msg_seqs = [e.seq for e in published if e.kind == "message"]
    assert msg_seqs == sorted(msg_seqs)


async def test_two_processes_writing_one_room_keep_seq_gapless(db_conninfo):
    # Two independent pools + writers stand in for two chatd processes.
    async with open_pool(db_conninfo, size=3, acquire_timeout=5, connect_timeout=5, query_timeout=30) as p1, \
            open_pool(db_conninfo, size=3, acquire_timeout=5, connect_timeout=5, query_timeout=30) as p2:
        room = await _setup_room(p1)
        acks = []

        async def process(pool, tag):
            async def work(writer):
                async def one(i):
                    acks.append(await writer.run(mu.Send(user_id="alice", client_id=f"{tag}{i}", room_id=room, body="x")))

                async with trio.open_nursery() as n:
                    for i in range(150):
                        n.start_soon(one, i)

            await _run_writer(pool, work)

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(process, p1, "a")
                n.start_soon(process, p2, "b")
        rows = await p1.fetch("SELECT seq FROM events WHERE room_id = %s ORDER BY seq", (room,))
        seqs = [r["seq"] for r in rows]
        assert seqs == list(range(1, len(seqs) + 1))
        last = await p1.fetchone("SELECT last_seq FROM rooms WHERE id = %s", (room,))
        assert last["last_seq"] == len(seqs)
        assert len({a["seq"] for a in acks}) == 300


async def test_retried_send_returns_original_result_and_creates_nothing(pool):
    room = await _setup_room(pool)

    async def work(writer):
        first = await writer.run(mu.Send(user_id="alice", client_id="same", room_id=room, body="once"))
        again = await writer.run(mu.Send(user_id="alice", client_id="same", room_id=room, body="once"))
        return first, again

    (first, again), _ = await _run_writer(pool, work)
    assert again["seq"] == first["seq"] and again["duplicate"] and not first["duplicate"]
    # After a "restart" (a new writer on a new pool) the key still holds.
    (third, _x), _ = await _run_writer(pool, lambda w: _pair(w, room))
    assert third["seq"] == first["seq"] and third["duplicate"]
    count = await pool.fetchone("SELECT count(*) AS n FROM events WHERE room_id = %s AND kind = 'message'", (room,))
    assert count["n"] == 1


async def test_a_key_committed_by_another_process_meanwhile_is_answered_as_its_duplicate(pool):
    # Another process's transaction holds the same key, uncommitted, while our batch
    # runs: our statement waits on it, fails when it commits, and the writer's retry
    # answers with that process's result. Nothing of the failed attempt remains.
    room = await _setup_room(pool)
    before = await pool.fetchone("SELECT last_seq FROM rooms WHERE id = %s", (room,))
    theirs = {"seq": before["last_seq"] + 1, "at": 1.5}
    async with pool.connection() as other, pool.connection() as watcher:
        async with trio.open_nursery() as n:
            async with other.transaction():
                await other.execute(
                    "INSERT INTO idempotency (user_id, client_id, command, result) VALUES ('alice', 'raced', 'send', %s)",
                    (json.dumps(theirs),),
                )
                outcome = []

                async def send():
                    outcome.append(await _run_writer(pool, lambda w: w.run(mu.Send(user_id="alice", client_id="raced", room_id=room, body="x"))))

                n.start_soon(send)
                with trio.fail_after(10):  # until our statement waits on their row
                    while not (await (await watcher.execute(
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )).fetchone())["n"]:
                        await trio.sleep(0.01)
    (result, published) = outcome[0]
    assert result == {**theirs, "duplicate": True}
    assert published == []
    after = await pool.fetchone("SELECT last_seq FROM rooms WHERE id = %s", (room,))
    assert after["last_seq"] == before["last_seq"]
    count = await pool.fetchone("SELECT count(*) AS n FROM events WHERE room_id = %s AND kind = 'message'", (room,))
    assert count["n"] == 0


async def test_a_batch_is_published_and_answered_inside_one_hold(pool):
    # The transport holds outgoing frames while the writer is inside hold(): the
    # events and the acks of a batch must all be handed over in there.
    room = await _setup_room(pool)
    inside = [False]
    seen = []

    @contextlib.contextmanager
    def hold():
        inside[0] = True
        yield
        inside[0] = False
        seen.append("released")

    def publish(events):
        seen.append(("published", inside[0], len(events)))

    sends = [mu.Send(user_id="alice", client_id=f"h{i}", room_id=room, body="x") for i in range(3)]

    async def work(writer):
        writer.publish = publish
        writer.hold = hold
        done = trio.Event()

        def answered(result, error):
            assert error is None
            seen.append(("answered", inside[0]))
            if len(seen) == 4:
                done.set()

        for mutation in sends:  # queued together: one batch
            mutation.on_done = answered
            writer.submit(mutation)
        await done.wait()

    await _run_writer(pool, work)
    assert seen[0] == ("published", True, 3)
    assert seen[1:4] == [("answered", True)] * 3 and seen[4] == "released"


async def _pair(writer, room):
    return await writer.run(mu.Send(user_id="alice", client_id="same", room_id=room, body="once")), None


async def _submit_all(writer, mutations) -> list[tuple]:
    """Queue every mutation at once (nothing runs in between); (result, error) of each."""
    results = []
    done = trio.Event()

    def collect(result, error):
        results.append((result, error))
        if len(results) == len(mutations):
            done.set()

    for mutation in mutations:
        mutation.on_done = collect
        writer.submit(mutation)
    await done.wait()
    return results


async def test_duplicate_ids_inside_one_batch_create_one_message(pool):
    room = await _setup_room(pool)
    # queued before the writer runs: same batch
    sends = [mu.Send(user_id="bob", client_id="dup", room_id=room, body="b") for _ in range(3)]
    results, _ = await _run_writer(pool, lambda writer: _submit_all(writer, sends))
    seqs = {r[0]["seq"] for r in results}
    assert len(seqs) == 1 and sum(1 for r in results if r[0]["duplicate"]) == 2


AWKWARD_TEXT = [
    'quote " and backslash \\ and \\" together',
    '{"seq": 1, "at": 2}',  # looks like the batch document's own JSON
    "tab\tnewline\ncr\r line separator \u2028 paragraph \u2029",
    "non-BMP 👍🏽 𝄞 and combining e\u0301",
    "NULL",
    "x" * 4000,
]


async def test_awkward_text_travels_through_one_batch_exactly(pool):
    room = await _setup_room(pool)
    other = await _setup_room(pool, owner="bob", members=("alice",), client_id="create-2")
    sends = [
        mu.Send(user_id="alice" if i % 2 else "bob", client_id=f'id "{i}" \\ 👍', room_id=(room, other)[i % 2], body=body,
                reply_to=None)
        for i, body in enumerate(AWKWARD_TEXT)
    ]
    results, published = await _run_writer(pool, lambda writer: _submit_all(writer, sends))
    assert all(error is None for _, error in results)
    rows = await pool.fetch(
        "SELECT e.room_id, e.sender, e.body, i.client_id FROM events e JOIN idempotency i"
        " ON i.user_id = e.sender AND (i.result->>'seq')::bigint = e.seq"
        " WHERE e.kind = 'message' AND e.room_id = ANY(%s)", ([room, other],))
    stored = {(r["room_id"], r["sender"], r["body"], r["client_id"]) for r in rows}
    assert stored == {(s.room_id, s.user_id, s.body, s.client_id) for s in sends}
    assert sorted(e.data["body"] for e in published if e.kind == "message") == sorted(AWKWARD_TEXT)


async def test_non_member_send_is_not_found_and_others_in_batch_commit(pool):
    room = await _setup_room(pool)
    results = {}

    async def work(writer):
        done = trio.Event()

        def collect(name):
            def cb(result, error):
                results[name] = (result, error)
                if len(results) == 2:
                    done.set()
            return cb

        writer.submit(mu.Send(user_id="mallory", client_id="x", room_id=room, body="evil", on_done=collect("mallory")))
        writer.submit(mu.Send(user_id="alice", client_id="y", room_id=room, body="ok", on_done=collect("alice")))
        await done.wait()

    await _run_writer(pool, work)
    assert isinstance(results["mallory"][1], errors.NotFound)
    assert results["alice"][1] is None


async def test_rejected_mutation_in_batch_leaves_no_trace(pool):
    room = await _setup_room(pool)

    async def work(writer):
        sent = await writer.run(mu.Send(user_id="alice", client_id="s1", room_id=room, body="mine"))
        try:
            await writer.run(mu.Edit(user_id="bob", client_id="e1", room_id=room, seq=sent["seq"], body="hijack"))
        except errors.Forbidden:
            pass
        else:
            raise AssertionError("bob edited alice's message")
        return sent

    sent, published = await _run_writer(pool, work)
    row = await pool.fetchone("SELECT body, edited FROM events WHERE room_id = %s AND seq = %s", (room, sent["seq"]))
    assert row == {"body": "mine", "edited": False}
    last = await pool.fetchone("SELECT last_seq FROM rooms WHERE id = %s", (room,))
    assert last["last_seq"] == sent["seq"]
    idem = await pool.fetchone("SELECT count(*) AS n FROM idempotency WHERE client_id = 'e1'")
    assert idem["n"] == 0


async def test_nothing_is_acked_when_the_database_is_gone(db_conninfo):
    async with open_pool(db_conninfo, size=2, acquire_timeout=1, connect_timeout=1, query_timeout=5) as pool:
        room = await _setup_room(pool)
        published = []
        writer = Writer(pool, max_batch=10, queue_size=100, publish=published.extend)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.serve)
            # Point the pool at a server that does not exist: every commit fails.
            pool.conninfo = "host=127.0.0.1 port=1 user=x dbname=x connect_timeout=1"
            await pool.aclose()
            pool._closed = False
            with trio.fail_after(15):
                try:
                    await writer.run(mu.Send(user_id="alice", client_id="lost", room_id=room, body="x"))
                except errors.Unavailable:
                    pass
                else:
                    raise AssertionError("acked without a database")
            nursery.cancel_scope.cancel()
        assert not [e for e in published if e.kind == "message"]


async def test_a_crashing_mutation_fails_its_batch_and_the_writer_lives_on(pool, monkeypatch):
    room = await _setup_room(pool)

    async def broken(tx, sends):
        raise RuntimeError("bug in the send path")

    async def work(writer):
        with monkeypatch.context() as patch:
            patch.setattr("chatd.store.writer.send_batch", broken)
            try:
                await writer.run(mu.Send(user_id="alice", client_id="c1", room_id=room, body="x"))
            except errors.Internal:
                pass
            else:
                raise AssertionError("a crashed batch was acked")
        return await writer.run(mu.Send(user_id="alice", client_id="c1", room_id=room, body="x"))

    result, _ = await _run_writer(pool, work)
    assert result["duplicate"] is False and result["seq"] > 0


async def _pipelined(pool, work, *, pipeline=3, max_batch=10):
    """_run_writer with several batches in flight; returns (writer, result, published)."""
    used = []

    async def run(writer):
        used.append(writer)
        with trio.fail_after(30):
            return await work(writer)

    result, published = await _run_writer(pool, run, pipeline=pipeline, max_batch=max_batch)
    return used[0], result, published


async def test_pipelined_batches_answer_in_order_with_gapless_seqs(pool, monkeypatch):
    # A batch's statement runs while the batch before is still publishing: with
    # chunks of 2 events the publish checkpoints, and the next batch gets in.
    monkeypatch.setattr("chatd.store.writer.PUBLISH_CHUNK", 2)
    rooms = [await _setup_room(pool, members=("bob", "carol"), client_id=f"room-{k}") for k in range(3)]
    answered: list[int] = []
    results: dict[int, dict] = {}
    total = 600

    async def work(writer):
        done = trio.Event()

        def answer(i):
            def on_done(result, error):
                assert error is None, error
                answered.append(i)
                results[i] = result
                if len(answered) == total:
                    done.set()
            return on_done

        for i in range(total):
            user = ("alice", "bob", "carol")[i % 3]
            writer.submit(mu.Send(user_id=user, client_id=f"p{i}", room_id=rooms[i % 3], body=str(i), on_done=answer(i)))
            if i % 7 == 0:
                await trio.sleep(0)  # let batches form while others are in flight
        await done.wait()

    writer, _, published = await _pipelined(pool, work)
    assert writer.max_in_flight > 1, "no two batches were ever in flight: nothing was pipelined"
    assert answered == list(range(total))  # answered in the order submitted
    for k, room in enumerate(rooms):
        mine = [i for i in range(total) if i % 3 == k]
        seqs = [results[i]["seq"] for i in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(mine)))  # gapless, in the order sent
        live = [e.seq for e in published if e.room_id == room and e.kind == "message"]
        assert live == seqs  # published once each, in seq order
        rows = await pool.fetch("SELECT seq, body FROM events WHERE room_id = %s AND kind = 'message' ORDER BY seq", (room,))
        assert [(r["seq"], r["body"]) for r in rows] == [(results[i]["seq"], str(i)) for i in mine]


async def test_a_retry_in_the_next_pipelined_batch_is_a_duplicate(pool):
    room = await _setup_room(pool)
    # max_batch=1: two batches, in flight together
    sends = [mu.Send(user_id="alice", client_id="again", room_id=room, body="x") for _ in range(2)]
    _, results, _ = await _pipelined(pool, lambda writer: _submit_all(writer, sends), max_batch=1)
    (first, e1), (second, e2) = results
    assert e1 is None and e2 is None
    assert second["seq"] == first["seq"] and second["duplicate"] and not first["duplicate"]
    count = await pool.fetchone("SELECT count(*) AS n FROM events WHERE room_id = %s AND kind = 'message'", (room,))
    assert count["n"] == 1


async def test_other_mutations_between_pipelined_sends_keep_seqs_gapless(pool):
    room = await _setup_room(pool)
    order = []

    async def work(writer):
        async def send(i):
            order.append(("send", (await writer.run(mu.Send(user_id="alice", client_id=f"s{i}", room_id=room, body="b")))["seq"]))

        async def add(user):
            order.append(("add", (await writer.run(ms.AddMember(user_id="alice", client_id=f"add-{user}", room_id=room, target=user)))["seq"]))

        await pool.execute("INSERT INTO users (id) VALUES ('dave'), ('erin') ON CONFLICT DO NOTHING")
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(send, i)
                if i in (10, 30):
                    n.start_soon(add, "dave" if i == 10 else "erin")
                await trio.sleep(0)

    writer, _, published = await _pipelined(pool, work, max_batch=5)
    seqs = sorted(seq for _, seq in order)
    assert seqs == list(range(seqs[0], seqs[0] + 42))
    assert [e.seq for e in published] == sorted(e.seq for e in published)
    rows = await pool.fetch("SELECT user_id FROM members WHERE room_id = %s AND left_seq IS NULL ORDER BY user_id", (room,))
    assert [r["user_id"] for r in rows] == ["alice", "bob", "dave", "erin"]


async def _stream(writer, room, total, per_ms, tag):
    """Submit ``total`` sends, ``per_ms`` about every millisecond; wait for every answer."""
    results: dict[int, dict] = {}
    done = trio.Event()

    def answer(i):
        def on_done(result, error):
            assert error is None, error
            results[i] = result
            if len(results) == total:
                done.set()
        return on_done

    for i in range(total):
        writer.submit(mu.Send(user_id="alice" if i % 2 else "bob", client_id=f"{tag}{i}", room_id=room, body=str(i), on_done=answer(i)))
        if i % per_ms == per_ms - 1:
            await trio.sleep(0.001)
    await done.wait()
    return writer.batches, writer.lingered, [results[i]["seq"] for i in range(total)]


async def test_a_steady_stream_of_sends_lingers_into_fewer_fuller_batches(pool):
    room = await _setup_room(pool)
    total = 400
    with trio.fail_after(60):
        (plain_batches, plain_lingered, _), _ = await _run_writer(pool, lambda w: _stream(w, room, total, 4, "plain"))
        (batches, lingered, seqs), published = await _run_writer(pool, lambda w: _stream(w, room, total, 4, "linger"), linger=0.03)
    assert plain_lingered == 0  # linger 0: never waits
    assert lingered > 0
    assert batches < plain_batches, (batches, plain_batches)
    assert seqs == list(range(seqs[0], seqs[0] + total))  # gapless, in the order sent
    assert [e.seq for e in published if e.kind == "message"] == seqs


async def test_a_lingering_batch_starts_once_the_expected_mutations_have_arrived(pool):
    # A 1 s linger, but at a send a millisecond a batch of max_batch=6 is expected
    # within ~6 ms: each lingering batch must start once its six are queued. Only
    # the last one, short of six when the stream ends, may wait the whole second.
    room = await _setup_room(pool)
    with trio.fail_after(30):
        start = trio.current_time()
        (_, lingered, seqs), _ = await _run_writer(pool, lambda w: _stream(w, room, 48, 1, "fill"), linger=1.0, max_batch=6)
        took = trio.current_time() - start
    assert took < lingered * 1.0, f"{lingered} lingering batches took {took:.2f}s: they waited out the linger"
    assert lingered >= 2
    assert seqs == list(range(seqs[0], seqs[0] + 48))


async def test_a_send_on_a_quiet_writer_does_not_linger(pool):
    room = await _setup_room(pool)

    async def work(writer):
        for i in range(5):
            await trio.sleep(0.2)  # 5 sends a second: far below two per linger
            await writer.run(mu.Send(user_id="alice", client_id=f"q{i}", room_id=room, body="x"))
        return writer.lingered

    with trio.fail_after(30):
        lingered, _ = await _run_writer(pool, work, linger=0.02)
    assert lingered == 0


async def _publish_watch(pool, mutations, monkeypatch, **options):
    """Queue ``mutations`` at once; for each publish, the batches in flight at that moment.

    PUBLISH_HOLD is raised to far beyond the test's deadline: a publish held for a
    statement that never reports leaving would end the test with a timeout.
    """
    monkeypatch.setattr("chatd.store.writer.PUBLISH_HOLD", 60.0)
    seen: list[tuple[list[int], int]] = []

    def publish(events):
        seen.append(([e.seq for e in events], writer.in_flight))

    writer = Writer(pool, publish=publish, **{"max_batch": 5, "queue_size": 100, "pipeline": 2, **options})
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        with trio.fail_after(20):
            results = await _submit_all(writer, mutations)
        nursery.cancel_scope.cancel()
    return results, seen


async def test_a_batch_publishes_once_the_waiting_batchs_statement_has_left(pool, monkeypatch):
    # Ten sends at once, batches of five: the second batch is waiting when the first
    # commits, so the first publishes only once the second's statement is executing
    # (two batches in flight), and the database works while the loop publishes.
    room = await _setup_room(pool)
    sends = [mu.Send(user_id="alice", client_id=f"h{i}", room_id=room, body=str(i)) for i in range(10)]
    results, seen = await _publish_watch(pool, sends, monkeypatch)
    assert all(error is None for _, error in results)
    seqs = [result["seq"] for result, _ in results]
    assert seqs == list(range(seqs[0], seqs[0] + 10))
    assert [s for published, _ in seen for s in published] == seqs  # in order, once each
    assert seen[0][1] == 2, "the first batch published before the next one's statement left"
    assert seen[-1][1] == 1  # nothing was waiting behind the last batch: no hold


async def test_a_batch_holds_its_publish_for_a_waiting_transaction_too(pool, monkeypatch):
    # The batch behind holds a membership change: a transaction, not the send
    # statement. It lets the batch before publish once its transaction has begun.
    room = await _setup_room(pool)
    await pool.execute("INSERT INTO users (id) VALUES ('dave') ON CONFLICT DO NOTHING")
    sends = [mu.Send(user_id="alice", client_id=f"t{i}", room_id=room, body=str(i)) for i in range(5)]
    add = ms.AddMember(user_id="alice", client_id="add-dave", room_id=room, target="dave")
    results, seen = await _publish_watch(pool, [*sends, add], monkeypatch)
    assert all(error is None for _, error in results)
    assert seen[0][1] == 2
    assert [s for published, _ in seen for s in published] == sorted(s for published, _ in seen for s in published)


async def test_a_lone_batch_publishes_without_holding(pool, monkeypatch):
    # Nothing waits behind it (and with pipeline 1 nothing could run beside it):
    # a 60 s hold would fail the test's 20 s deadline.
    room = await _setup_room(pool)
    for pipeline in (2, 1):
        sends = [mu.Send(user_id="alice", client_id=f"l{pipeline}-{i}", room_id=room, body="x") for i in range(3)]
        results, seen = await _publish_watch(pool, sends, monkeypatch, pipeline=pipeline)
        assert all(error is None for _, error in results)
        assert [in_flight for _, in_flight in seen] == [1]
    # pipeline 1 with a backlog: batches run one at a time, none holds for the next
    sends = [mu.Send(user_id="alice", client_id=f"b{i}", room_id=room, body="x") for i in range(10)]
    results, seen = await _publish_watch(pool, sends, monkeypatch, pipeline=1)
    assert all(error is None for _, error in results)
    assert [in_flight for _, in_flight in seen] == [1, 1]
