"""The scenarios: who connects, which rooms exist, and the load steps.

Every scenario is bounded: a fixed list of steps of fixed duration, each with a drain
limit, and the run's deadline stops stepping early. ``--quick`` shrinks them so one
run ends well within two minutes (CI smoke use).
"""

from __future__ import annotations

import statistics
import time

from chatd.bench import stats
from chatd.bench.steps import Context, gc_fields, latency_fields, merge_reports, message_step, other_cpu_pct, should_stop


def _spread(ctx: Context, users: list[str], rooms: dict[str, int]) -> dict[int, list[list[int]]]:
    """Sender lists per loader: [connection index, room id] for each sending user."""
    out: dict[int, list[list[int]]] = {}
    for user in users:
        k, idx = ctx.fleet.where[user]
        out.setdefault(k, []).append([idx, rooms[user]])
    return out


def _rates(senders: dict[int, list], total_rate: float) -> dict[int, float]:
    n = sum(len(v) for v in senders.values())
    return {k: total_rate * len(v) / n for k, v in senders.items()}


def _stepped(ctx: Context, plan: list[dict]) -> list[dict]:
    rows = []
    for i, step in enumerate(plan, 1):
        if ctx.out_of_time():
            ctx.summary["stopped"] = "run deadline reached"
            break
        row = {"step": i, **message_step(ctx, label=f"step {i}/{len(plan)}", **step)}
        rows.append(row)
        if should_stop(rows):
            ctx.summary["stopped"] = f"saturated at step {i}"
            break
    return rows


class Fanout:
    """One room of 1,000 members; stepped send rates until p99 or deliveries give out."""

    name = "fanout"

    def loaders(self, quick: bool) -> int:
        return 2

    def run(self, ctx: Context) -> list[dict]:
        members = 1000
        users = [f"fan{i}" for i in range(members)]
        ctx.connect(users)
        ctx.say("creating the room")
        (room,) = ctx.rooms([(users[0], {"type": "create_group", "title": "fanout", "members": users[1:]})])
        ctx.fleet.settle()
        senders = users[:10]
        ctx.fast_receivers(set(senders), sample_every=4)
        ctx.setup.update(members=members, senders=len(senders), room_id=room, latency_sampled_connections=members // 4)
        spread = _spread(ctx, senders, {u: room for u in senders})
        rates = [20, 100, 300] if ctx.quick else [10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 700, 1000]
        duration = 2.0 if ctx.quick else 5.0
        plan = [dict(offered=r, mode="rate", duration=duration, per_msg=members, senders=spread, rates=_rates(spread, r)) for r in rates]
        return _stepped(ctx, plan)


def _dm_pairs(ctx: Context, n: int, prefix: str) -> tuple[list[str], dict[str, int]]:
    users = [f"{prefix}{i}" for i in range(n)]
    ctx.connect(users)
    ctx.say(f"creating {n // 2} DM rooms")
    ids = ctx.rooms([(users[i], {"type": "create_dm", "user_id": users[i + 1]}) for i in range(0, n, 2)])
    rooms = {}
    for j, room in enumerate(ids):
        rooms[users[2 * j]] = rooms[users[2 * j + 1]] = room
    ctx.fleet.settle()
    return users, rooms


class Dm:
    """10,000 connections in 5,000 rooms of 2, every connection sending (durable sends for chatd)."""

    name = "dm"

    def loaders(self, quick: bool) -> int:
        return 2

    def run(self, ctx: Context) -> list[dict]:
        n = 2000 if ctx.quick else 10000
        users, rooms = _dm_pairs(ctx, n, "dm")
        ctx.setup.update(connections=n, rooms=n // 2)
        spread = _spread(ctx, users, rooms)
        per_conn = [1.0] if ctx.quick else [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
        duration = 3.0 if ctx.quick else 5.0
        plan = [dict(offered=r * n, mode="rate", duration=duration, per_msg=2, senders=spread, rates=_rates(spread, r * n)) for r in per_conn]
        rows = _stepped(ctx, plan)
        for row, r in zip(rows, per_conn):
            row["msgs_per_conn_per_s"] = r
        return rows


class Durable:
    """Senders in rooms of 2, each sending the next message when the last was acked."""

    name = "durable"

    def loaders(self, quick: bool) -> int:
        return 2

    def run(self, ctx: Context) -> list[dict]:
        n = 200 if ctx.quick else 1000
        users, rooms = _dm_pairs(ctx, n, "dur")
        ctx.setup.update(connections=n, rooms=n // 2, window=1)
        counts = [50, 200] if ctx.quick else [50, 200, 500, 1000]
        duration = 3.0 if ctx.quick else 5.0
        plan = []
        for count in counts:
            spread = _spread(ctx, users[:count], rooms)
            plan.append(dict(offered=None, mode="closed", duration=duration, per_msg=2, senders=spread, rates={}))
        rows = _stepped(ctx, plan)
        for row, count in zip(rows, counts):
            row["senders"] = count
            row["committed_msgs_per_s"] = row["achieved_rate"]
        return rows


class Idle:
    """Connections in rooms of 100: RSS per connection, connect rate, responsiveness while connecting."""

    name = "idle"

    def loaders(self, quick: bool) -> int:
        return 2 if quick else 4

    def run(self, ctx: Context) -> list[dict]:
        total = 2000 if ctx.quick else 19000
        batches = 2 if ctx.quick else 4
        target, fleet = ctx.target, ctx.fleet
        ctx.connect(["probe"])
        time.sleep(0.5)
        base = target.rss()
        k, idx = fleet.where["probe"]
        fleet.loaders[k].send({"op": "probe", "on": True, "idx": idx, "interval": 0.02})
        ctx.setup.update(connections=total, room_size=100, probe_interval_ms=20, rss_before_bytes=base)
        users = [f"idle{i}" for i in range(total)]
        size = -(-total // batches // 100) * 100
        rows: list[dict] = []
        for i, at in enumerate(range(0, total, size), 1):
            if ctx.out_of_time():
                ctx.summary["stopped"] = "run deadline reached"
                break
            batch = users[at : at + size]
            fleet.reports()
            meter = target.meter()
            meter.mark()
            fleet.mark_cpu()
            t0 = time.monotonic_ns()
            done = ctx.connect(batch)
            connect_s = done["seconds"]
            connect_ns, _ = meter.since()  # the connects alone, before their rooms are made
            connect_wall_ns = time.monotonic_ns() - t0
            ctx.say(f"step {i}/{batches}: rooms of 100")
            ctx.rooms([(b[0], {"type": "create_group", "title": "idle", "members": b[1:]}) for b in _blocks(batch, 100) if len(b) > 1])
            fleet.settle()
            server_ns, db_ns = meter.since()
            loader_sum, loader_max, loader_ns = fleet.cpu_pct()
            t_end = time.monotonic_ns()
            other = other_cpu_pct(meter, server_ns + db_ns + loader_ns, t_end - t0)
            r = merge_reports(fleet.reports())
            rss = target.rss()
            conns = r["open"] - 1  # without the probe
            connect = stats.percentiles(r["connect"])
            rows.append({
                "step": i, "connections": conns, "new_connections": len(batch),
                "connect_rate": round(len(batch) / connect_s, 1), "connect_p50_ms": connect["p50"], "connect_p99_ms": connect["p99"],
                "offered_rate": None, "achieved_rate": None, "deliveries_per_s": None, "server_cpu_us_per_delivery": None,
                "server_cpu_us_per_conn": round(server_ns / 1000 / len(batch), 1),
                "connect_server_cpu_us_per_conn": round(connect_ns / 1000 / len(batch), 1),
                "connect_server_cpu_pct": round(connect_ns * 100 / connect_wall_ns, 1),
                "server_cpu_pct": round(server_ns * 100 / (t_end - t0), 1),
                "db_cpu_pct": round(db_ns * 100 / (t_end - t0), 1) if target.has_db else None,
                "server_rss_bytes": rss, "db_rss_bytes": target.db_rss(),
                "rss_bytes_per_conn": round((rss - base) / max(1, conns)),
                # A ping still unanswered when the step ends counts with its wait so far.
                **latency_fields("latency", r["probe"], max(r["probe_max"], r["probe_waiting_us"])),
                "errors": r["failed"] + sum(r["errors"].values()), "error_kinds": dict(r["errors"]),
                "slow_consumer_closes": r["closes"].pop("4008", 0), "other_closes": sum(r["closes"].values()),
                **gc_fields(target, t0, t_end),
                "loader_cpu_pct": loader_sum, "loader_cpu_pct_max": loader_max, "other_cpu_pct": other,
            })
            rows[-1]["ok"] = rows[-1]["errors"] == 0 and (rows[-1]["latency_p99_ms"] or 0) < 50
        fleet.broadcast({"op": "probe", "on": False, "idx": 0, "interval": 1})
        ctx.summary.update(self._hold(ctx))
        if not ctx.out_of_time():
            ctx.summary.update(self._disconnect(ctx))
        return rows

    def _hold(self, ctx: Context, seconds: float = 5.0) -> dict:
        """Server CPU and RSS while every connection sits idle."""
        ctx.say(f"idle for {seconds:.0f} s")
        ctx.fast_receivers({"probe"}, sample_every=1)  # the probe keeps parsing: it pings in _disconnect
        meter = ctx.target.meter()
        meter.mark()
        time.sleep(seconds)
        own, db = meter.since()
        return {"idle_server_cpu_pct": round(own * 100 / (seconds * 1e9), 2), "idle_server_rss_bytes": ctx.target.rss()}

    def _disconnect(self, ctx: Context, seconds: float = 5.0) -> dict:
        """Every client but the probe drops at once (no close frame, as when a network
        path fails); the probe's ping, the server's CPU and its GC pauses over ``seconds``."""
        ctx.say(f"every client drops at once; probing for {seconds:.0f} s")
        fleet, target = ctx.fleet, ctx.target
        k, idx = fleet.where["probe"]
        fleet.loaders[k].send({"op": "probe", "on": True, "idx": idx, "interval": 0.02})
        fleet.reports()  # counters start at zero
        meter = target.meter()
        meter.mark()
        t0 = time.monotonic_ns()
        for i, loader in enumerate(fleet.loaders):
            loader.send({"op": "drop", "keep": [idx] if i == k else []})
        dropped = sum(loader.expect("dropped", 60)["count"] for loader in fleet.loaders)
        time.sleep(seconds)
        t_end = time.monotonic_ns()
        own, _db = meter.since()
        r = merge_reports(fleet.reports())
        fleet.loaders[k].send({"op": "probe", "on": False, "idx": idx, "interval": 1})
        ping = stats.percentiles(r["probe"], max_us=r["probe_max"] if r["probe"] else None)
        # A ping still unanswered at the end counts with the time it has waited so far.
        longest = max(ping["max"] or 0, r["probe_waiting_us"] / 1000)
        gc = gc_fields(target, t0, t_end)
        return {
            "disconnected": dropped,
            "disconnect_server_cpu_us_per_conn": round(own / 1000 / max(1, dropped), 1),
            "disconnect_pings_answered": ping["n"],
            "disconnect_ping_p99_ms": ping["p99"], "disconnect_ping_max_ms": round(longest, 3),
            "disconnect_max_gc_pause_ms": gc["max_gc_pause_ms"], "disconnect_max_gc_pause_cpu_ms": gc["max_gc_pause_cpu_ms"],
            "disconnect_max_gc_pause_generation": gc["max_gc_pause_generation"],
        }


class Mixed:
    """Rooms of 10: sends, typing, presence churn, and 10 % of clients dropping and resyncing mid-step."""

    name = "mixed"

    def loaders(self, quick: bool) -> int:
        return 2

    def run(self, ctx: Context) -> list[dict]:
        n = 400 if ctx.quick else 2000
        users = [f"mix{i}" for i in range(n)]
        ctx.connect(users)
        ctx.say("creating rooms of 10")
        blocks = _blocks(users, 10)
        ids = ctx.rooms([(b[0], {"type": "create_group", "title": "mixed", "members": b[1:]}) for b in blocks])
        rooms = {user: room for block, room in zip(blocks, ids) for user in block}
        ctx.say("subscribing to room-mates' presence")
        ctx.fleet.calls([(u, {"type": "subscribe_presence", "user_ids": [m for m in b if m != u]}) for b in blocks for u in b], timeout=300)
        ctx.fleet.settle()
        storm = set(users[:: 10])  # 10 % of the clients
        ctx.setup.update(connections=n, rooms=len(blocks), room_size=10, storm_clients=len(storm), typing_per_msg=2, presence_changes_per_conn_per_s=0.1)
        per_conn = [0.5] if ctx.quick else [0.2, 0.5, 1.0, 2.0]
        duration = 4.0 if ctx.quick else 8.0
        rows = []
        for i, r in enumerate(per_conn, 1):
            if ctx.out_of_time():
                ctx.summary["stopped"] = "run deadline reached"
                break
            row = {"step": i, **mixed_step(ctx, users, rooms, storm, r * n, duration, label=f"step {i}/{len(per_conn)}")}
            row["msgs_per_conn_per_s"] = r
            rows.append(row)
            if should_stop(rows):
                ctx.summary["stopped"] = f"saturated at step {i}"
                break
        return rows


def mixed_step(ctx: Context, users: list[str], rooms: dict[str, int], storm: set[str], rate: float, duration: float, label: str) -> dict:
    fleet = ctx.fleet
    per: dict[int, list] = {}
    storms: dict[int, list[int]] = {}
    for user in users:
        k, idx = fleet.where[user]
        per.setdefault(k, []).append([idx, rooms[user]])
        if user in storm:
            storms.setdefault(k, []).append(idx)
    n = len(users)
    commands = {}
    for k, senders in per.items():
        share = len(senders) / n
        commands[k] = {"op": "mixed", "senders": senders, "duration": duration, "msg_rate": rate * share,
                       "typing_rate": 2 * rate * share, "presence_rate": 0.1 * len(senders),
                       "storm": storms.get(k, []), "storm_at": duration / 2, "behind": 20}
    row = message_step(ctx, offered=rate, mode="mixed", duration=duration, per_msg=10, senders={}, rates={}, label=label, commands=commands)
    return row


def _blocks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Start:
    """Spawn to ready: a first start, then warm restarts on the same state.

    For chatd, ready is ``/readyz`` answering 200 (its embedded PostgreSQL up, the
    schema migrated, the listeners open); the first start also runs ``initdb``. For a
    peer, ready is its port accepting a connection. No loaders: each restart ends the
    server with SIGTERM and starts it again.
    """

    name = "start"
    uses_loaders = False

    def loaders(self, quick: bool) -> int:
        return 0

    def run(self, ctx: Context) -> list[dict]:
        restarts = 2 if ctx.quick else 5
        ctx.setup.update(restarts=restarts)
        rows: list[dict] = []
        for i in range(restarts + 1):
            if ctx.out_of_time():
                ctx.summary["stopped"] = "run deadline reached"
                break
            ctx.say("first start" if i == 0 else f"warm restart {i}/{restarts}")
            if i == 0:
                ctx.target.start()
            else:
                ctx.target.restart()
            rows.append({"step": i + 1, "start": "first" if i == 0 else "warm", "ready_s": round(ctx.target.ready_s, 3),
                         "server_rss_bytes": ctx.target.rss()})
        warm = [row["ready_s"] for row in rows if row["start"] == "warm"]
        ctx.summary.update(first_start_s=rows[0]["ready_s"] if rows else None,
                           warm_start_s=round(statistics.median(warm), 3) if warm else None,
                           warm_start_max_s=max(warm, default=None))
        return rows


SCENARIOS = {cls.name: cls for cls in (Fanout, Dm, Durable, Idle, Mixed, Start)}
