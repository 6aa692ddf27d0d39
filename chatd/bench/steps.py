"""One run of a scenario against one target, and the measurement of one load step.

A step: mark server/loader CPU, tell every loader its share of the sends, wait for the
send phase to end, then drain (until every acked message has reached every member, or
nothing moved for 2 s, or the drain limit) and collect the loaders' counters and
histograms. Server CPU covers the whole window, so CPU per delivery is exact.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chatd.bench import dbwatch, stats
from chatd.bench.fleet import BenchError, Fleet
from chatd.bench.targets import Target

P99_LIMIT_MS = 50.0
SUSTAINED_P99_MS = 1000.0  # beyond this a step is not "sustained": stepping stops
DRAIN_MAX = 15.0
DRAIN_QUIET = 2.0


@dataclass
class Context:
    target: Target
    fleet: Fleet
    quick: bool
    deadline: float  # time.monotonic() after which no new step starts
    progress: Callable[[str], None]
    log_dir: Path
    setup: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.progress(f"[{self.target.name}] {text}")

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def connect(self, users: list[str], concurrency: int = 256) -> dict:
        total = len(users)
        goal = len(self.fleet.where) + total

        def show(polled: dict) -> None:
            self.say(f"connecting: {polled.get('open', 0)} of {goal} open")

        done = self.fleet.connect(users, concurrency=concurrency, progress=show)
        if done["failed"] > max(0, total // 100):
            raise BenchError(f"{done['failed']} of {total} connections failed (see {self.log_dir}/loader-*.log)")
        return done

    def rooms(self, calls: list[tuple[str, dict]]) -> list[int]:
        """Run create_group / create_dm calls; the room ids, in order. Raises BenchError on any error."""
        results = []
        for at in range(0, len(calls), 2000):
            results += self.fleet.calls(calls[at : at + 2000], timeout=300)
        bad = [r for r in results if "room_id" not in r]
        if bad:
            raise BenchError(f"{len(bad)} room set-up calls failed, e.g. {bad[0]}")
        return [r["room_id"] for r in results]

    def fast_receivers(self, senders: set[str], sample_every: int) -> None:
        """Switch every connection but the senders' to stamp counting (call when quiet)."""
        keep: dict[int, list[int]] = {}
        for user in senders:
            k, idx = self.fleet.where[user]
            keep.setdefault(k, []).append(idx)
        for k, loader in enumerate(self.fleet.loaders):
            loader.send({"op": "fast", "except": keep.get(k, []), "sample_every": sample_every})


def merge_reports(reports: list[dict]) -> dict:
    total: dict = {"errors": Counter(), "closes": Counter()}
    for key in ("sent", "acked", "skipped", "deliveries", "failed", "open", "dropped"):
        total[key] = sum(r[key] for r in reports)
    for key in ("lat", "ack", "probe", "connect", "sync"):
        total[key] = stats.merge(r[key] for r in reports)
    for key in ("lat_max", "ack_max", "probe_max", "sync_max", "probe_waiting_us"):
        total[key] = max(r.get(key, 0) for r in reports)
    for r in reports:
        total["errors"].update(r["errors"])
        total["closes"].update(r["closes"])
    return total


def gc_fields(target, start_ns: int, end_ns: int) -> dict:
    """The longest GC pause of the step, wall time and the collector's CPU time, and the
    generation of the collection that took that CPU time."""
    wall, cpu, generation = target.gc_pause_ms(start_ns, end_ns)
    return {"max_gc_pause_ms": wall, "max_gc_pause_cpu_ms": cpu, "max_gc_pause_generation": generation}


def latency_fields(prefix: str, counts: dict, max_us: int | None) -> dict:
    p = stats.percentiles(counts, max_us=max_us if counts else None)
    return {f"{prefix}_{k}_ms": p[k] for k in ("p50", "p90", "p99", "p999", "max")}


def message_step(
    ctx: Context, *, offered: float | None, mode: str, duration: float, per_msg: int,
    senders: dict[int, list[list[int]]], rates: dict[int, float], window: int = 1, label: str = "",
    commands: dict[int, dict] | None = None,
) -> dict:
    """Run one send step; returns its row of figures (see docs/performance.md)."""
    sampler = ctx.target.db_sampler()
    if sampler is not None:
        sampler.start()
    try:
        return _message_step(ctx, sampler, offered=offered, mode=mode, duration=duration, per_msg=per_msg,
                             senders=senders, rates=rates, window=window, label=label, commands=commands)
    finally:
        if sampler is not None:
            sampler.stop()  # a no-op when the step took its figures already


def _message_step(
    ctx: Context, sampler, *, offered: float | None, mode: str, duration: float, per_msg: int,
    senders: dict[int, list[list[int]]], rates: dict[int, float], window: int, label: str,
    commands: dict[int, dict] | None,
) -> dict:
    target, fleet = ctx.target, ctx.fleet
    fleet.reports()  # counters start at zero
    meter = target.meter()
    meter.mark()
    fleet.mark_cpu()
    t0 = time.monotonic_ns()
    for k, loader in enumerate(fleet.loaders):
        if commands is not None:  # the mixed scenario's own schedule
            loader.send(commands.get(k) or {"op": "step", "mode": "rate", "rate": 0.0, "duration": duration, "senders": []})
            continue
        loader.send({"op": "step", "mode": mode, "rate": rates.get(k, 0.0), "duration": duration,
                     "senders": senders.get(k, []), "window": window})
    end = time.monotonic() + duration
    while time.monotonic() < end:
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        polled = fleet.poll()
        ctx.say(f"{label} sending: sent {polled.get('sent', 0)} acked {polled.get('acked', 0)} delivered {polled.get('deliveries', 0)}")
    for loader in fleet.loaders:
        loader.expect("step_done", duration + 60)
    t_sent = time.monotonic_ns()
    last, t_last, quiet_since = -1, t_sent, time.monotonic()
    drain_end = time.monotonic() + DRAIN_MAX
    while True:
        polled = fleet.poll()
        got = polled.get("deliveries", 0)
        if got != last:
            last, t_last, quiet_since = got, time.monotonic_ns(), time.monotonic()
        if polled.get("pending", 0) == 0 and got >= polled.get("acked", 0) * per_msg:
            break
        if time.monotonic() > drain_end or time.monotonic() - quiet_since > DRAIN_QUIET:
            break
        ctx.say(f"{label} draining: delivered {got} of {polled.get('acked', 0) * per_msg}")
        time.sleep(0.05)
    server_ns, db_ns = meter.since()
    loader = fleet.cpu_pct()
    t_end = time.monotonic_ns()
    db = sampler.stop() if sampler is not None else dbwatch.no_figures()
    other = other_cpu_pct(meter, server_ns + db_ns + loader[2], t_end - t0)
    r = merge_reports(fleet.reports())
    row = step_row(ctx, r, offered=offered, mode=mode, duration=duration, per_msg=per_msg,
                   elapsed_ns=max(t_sent, t_last) - t0, window_ns=t_end - t0, t0=t0, t_end=t_end,
                   server_ns=server_ns, db_ns=db_ns, loader=loader, other=other)
    row.update(db)
    return row


def other_cpu_pct(meter, ours_ns: int, window_ns: int) -> float:
    """CPU % (of one core) that processes outside the run used meanwhile: machine noise."""
    return round(max(0, meter.machine_since() - ours_ns) * 100 / max(1, window_ns), 1)


def step_row(ctx: Context, r: dict, *, offered, mode, duration, per_msg, elapsed_ns, window_ns, t0, t_end, server_ns, db_ns, loader, other) -> dict:
    target = ctx.target
    d = r["deliveries"]
    expected = r["acked"] * per_msg
    closes = r["closes"]
    slow = closes.pop("4008", 0)
    errors = sum(r["errors"].values())
    row = {
        "offered_rate": offered,
        "achieved_rate": round(r["acked"] / duration, 1),
        "sent": r["sent"],
        "acked": r["acked"],
        "skipped": r["skipped"],
        "deliveries": d,
        "expected_deliveries": expected,
        "missing_deliveries": max(0, expected - d),
        "deliveries_per_s": round(d * 1e9 / max(1, elapsed_ns), 1),
        "server_cpu_us_per_delivery": round(server_ns / 1000 / d, 3) if d else None,
        "server_cpu_pct": round(server_ns * 100 / window_ns, 1),
        "db_cpu_pct": round(db_ns * 100 / window_ns, 1) if target.has_db else None,
        "db_cpu_us_per_delivery": round(db_ns / 1000 / d, 3) if target.has_db and d else None,
        "server_rss_bytes": target.rss(),
        "db_rss_bytes": target.db_rss(),
        "rss_bytes_per_conn": None,
        **latency_fields("latency", r["lat"], r["lat_max"]),
        **latency_fields("ack", r["ack"], r["ack_max"]),
        "errors": errors + r["failed"],
        "error_kinds": dict(r["errors"]),
        "slow_consumer_closes": slow,
        "other_closes": sum(closes.values()),
        **gc_fields(target, t0, t_end),
        "loader_cpu_pct": loader[0],
        "loader_cpu_pct_max": loader[1],
        "loader_cpu_us_per_delivery": round(loader[2] / 1000 / d, 3) if d else None,
        "other_cpu_pct": other,
    }
    p99 = row["latency_p99_ms"]
    sustained = mode != "rate" or offered is None or r["acked"] >= 0.95 * offered * duration
    if mode == "mixed":
        # Storm clients miss live events while away and get them from sync instead:
        # "every delivery" is judged by sync answering, not by the live count.
        sync = stats.percentiles(r["sync"], max_us=r["sync_max"] if r["sync"] else None)
        connect = stats.percentiles(r["connect"])
        row.update(reconnects=connect["n"], reconnect_p99_ms=connect["p99"], syncs=sync["n"],
                   sync_p50_ms=sync["p50"], sync_p99_ms=sync["p99"], sync_max_ms=sync["max"], dropped_requests=r["dropped"])
        row["sustained"] = bool(d and p99 is not None and p99 < SUSTAINED_P99_MS and row["errors"] == 0 and slow == 0
                                and sync["n"] == connect["n"])
        row["ok"] = row["sustained"] and p99 < P99_LIMIT_MS
        return row
    row["sustained"] = bool(
        d and p99 is not None and p99 < SUSTAINED_P99_MS and row["missing_deliveries"] == 0
        and row["errors"] == 0 and slow == 0 and row["other_closes"] == 0 and sustained
    )
    row["ok"] = row["sustained"] and p99 < P99_LIMIT_MS
    return row


def saturation(rows: list[dict]) -> float | None:
    """The highest deliveries/s of a step whose p99 stayed under 50 ms with every delivery received."""
    good = [row["deliveries_per_s"] for row in rows if row.get("ok")]
    return max(good) if good else None


def max_sustained(rows: list[dict]) -> float | None:
    """The highest deliveries/s of a step the server kept up with (every delivery, p99 under 1 s)."""
    good = [row["deliveries_per_s"] for row in rows if row.get("sustained")]
    return max(good) if good else None


def should_stop(rows: list[dict]) -> bool:
    """Stepping ends once the server no longer keeps up: a step lost deliveries, fell
    short of the offered rate, closed slow consumers or had a p99 over 1 s. Steps whose
    p99 is only over 50 ms go on, so the throughput ceiling is found on a noisy machine too.
    """
    return bool(rows) and not rows[-1].get("sustained")
