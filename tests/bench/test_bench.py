"""`chatd bench`: the quick runs as CI uses them, the histogram they report from, and restarts."""

from __future__ import annotations

import gc
import json
import random
import statistics
import subprocess
import sys
import time
from http.client import HTTPConnection

import pytest

from chatd.bench import gcwatch, report, stats, targets
from chatd.bench.main import _best
from chatd.store.pgprocess import alive

STEP_KEYS = {
    "offered_rate", "achieved_rate", "deliveries_per_s", "server_cpu_us_per_delivery", "server_rss_bytes",
    "rss_bytes_per_conn", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_p999_ms",
    "latency_max_ms", "errors", "slow_consumer_closes", "max_gc_pause_ms", "max_gc_pause_cpu_ms", "max_gc_pause_generation",
    "loader_cpu_pct",
}


def test_percentiles_match_the_samples_within_one_percent():
    rng = random.Random(7)
    samples = sorted(int(rng.expovariate(1 / 3000)) for _ in range(50_000))
    counts = stats.new()
    for us in samples:
        counts[stats.bucket(us)] += 1
    got = stats.percentiles(stats.merge([stats.sparse(counts)]), max_us=samples[-1])
    for key, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
        exact = samples[int(q * len(samples)) - 1] / 1000
        assert got[key] == pytest.approx(exact, rel=0.01, abs=0.002)
    assert got["max"] == samples[-1] / 1000
    assert got["n"] == len(samples)


def test_the_gc_log_gives_each_pause_its_generation_and_cpu_time(tmp_path):
    log = tmp_path / "gc.log"
    hook = gcwatch.install(str(log), 0)
    was_enabled = gc.isenabled()
    gc.disable()  # only the three collections below
    try:
        start = time.monotonic_ns()
        for generation in (0, 1, 2):
            gc.collect(generation)
        end = time.monotonic_ns()
    finally:
        gc.callbacks.remove(hook)
        if was_enabled:
            gc.enable()
    pauses = gcwatch.read_pauses(str(log), start, end)
    assert [g for _, _, _, g in pauses] == [0, 1, 2]
    assert all(0 < cpu <= wall + 1_000_000 for _, wall, cpu, _ in pauses)
    assert gcwatch.read_pauses(str(log), end + 1, end + 10**9) == []  # only the window's pauses


def _quick(scenario: str, work_dir) -> dict:
    """``chatd bench SCENARIO --quick --json`` as CI runs it; its one JSON object."""
    done = subprocess.run(
        [sys.executable, "-m", "chatd", "bench", scenario, "--quick", "--json", "--work-dir", str(work_dir)],
        capture_output=True, text=True, timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout


@pytest.mark.slow
def test_quick_fanout_prints_one_json_object_with_the_documented_figures(tmp_path):
    result = _quick("fanout", tmp_path)
    assert result["scenario"] == "fanout" and result["target"] == "chatd" and "error" not in result
    assert result["steps"], result
    for step in result["steps"]:
        assert STEP_KEYS <= step.keys(), STEP_KEYS - step.keys()
    first = result["steps"][0]
    # 20 msgs/s into one room of 1,000: every acked message reached every member.
    assert first["acked"] > 0 and first["deliveries"] == first["acked"] * 1000
    assert first["server_cpu_us_per_delivery"] > 0 and first["server_rss_bytes"] > 0
    assert first["max_gc_pause_ms"] is not None
    assert 0 <= first["max_gc_pause_cpu_ms"] <= first["max_gc_pause_ms"] + 1  # CPU time cannot exceed wall time
    # The generation of the longest logged pause; none when no collection reached 0.1 ms.
    expected = (0, 1, 2) if first["max_gc_pause_ms"] > 0 else (None,)
    assert first["max_gc_pause_generation"] in expected
    # PostgreSQL was sampled through the step (20 samples a second; docs/performance.md).
    assert first["db_watch_error"] is None and first["db_samples"] >= 10, first
    assert 0 <= first["db_busy_pct"] <= 100
    assert "saturation_deliveries_per_s" in result
    assert not list(tmp_path.glob("run-*")), "the run's work directory is removed after a good run"


@pytest.mark.slow
def test_quick_idle_connects_everyone_then_measures_them_all_dropping_at_once(tmp_path):
    result = _quick("idle", tmp_path)
    assert "error" not in result and [s["connections"] for s in result["steps"]] == [1000, 2000]
    assert all(s["errors"] == 0 for s in result["steps"]) and result["connect_rate"] > 0
    # The connects' own CPU is part of the step's, which also makes the rooms.
    assert all(0 < s["connect_server_cpu_us_per_conn"] < s["server_cpu_us_per_conn"] for s in result["steps"])
    assert all(0 < s["connect_server_cpu_pct"] <= 200 for s in result["steps"])  # % of one core; two cores here
    assert 0 < result["rss_bytes_per_conn"] < 64_000
    # Every client but the probe dropped, and the probe's pings were answered meanwhile.
    assert result["disconnected"] == 2000
    assert result["disconnect_pings_answered"] > 10  # one every 20 ms for 5 s, while the server kept answering
    assert 0 < result["disconnect_ping_p99_ms"] <= result["disconnect_ping_max_ms"] < 5000
    assert result["disconnect_server_cpu_us_per_conn"] > 0 and result["disconnect_max_gc_pause_ms"] is not None


@pytest.mark.slow
def test_quick_start_times_a_first_start_then_warm_restarts(tmp_path):
    result = _quick("start", tmp_path)
    assert "error" not in result and result["setup"] == {"restarts": 2, "loaders": 0}, result
    steps = result["steps"]
    assert [s["start"] for s in steps] == ["first", "warm", "warm"]
    assert all(0 < s["ready_s"] < 60 and s["server_rss_bytes"] > 0 for s in steps), steps
    assert result["first_start_s"] == steps[0]["ready_s"]
    assert result["warm_start_s"] == pytest.approx(statistics.median(s["ready_s"] for s in steps[1:]), abs=0.001)
    assert result["warm_start_max_s"] == max(s["ready_s"] for s in steps[1:])
    assert not list(tmp_path.glob("run-*")), "the run's work directory is removed after a good run"


@pytest.mark.slow
def test_a_chatd_restart_keeps_its_database_and_ends_the_processes_it_started(tmp_path):
    target = targets.make("chatd", tmp_path / "run", tmp_path / "peers")
    first_pids: list[int] = []
    try:
        target.start()
        state, first_pids = target.state, [target.pid, *target.children]
        assert target.children, "the embedded PostgreSQL runs as chatd's child"
        _ready(target)
        target.restart()
        assert target.state == state and (state / "postgres" / "data" / "PG_VERSION").exists(), "a warm start on the same database"
        assert target.pid not in first_pids and not set(target.children) & set(first_pids)
        assert not [pid for pid in first_pids if alive(pid)], "the first server and its PostgreSQL ended"
        _ready(target)
    finally:
        last_pids = [target.pid, *target.children] if target.proc is not None else []
        target.stop()
    assert not [pid for pid in first_pids + last_pids if alive(pid)]
    assert target.state is None and not state.exists()


def _ready(target) -> None:
    http = HTTPConnection("127.0.0.1", target.http_port, timeout=5)
    try:
        http.request("GET", "/readyz")
        assert http.getresponse().status == 200
    finally:
        http.close()



def test_a_start_compare_keeps_each_targets_quickest_round_and_divides_step_by_step():
    def run(first: float, *warm: float) -> dict:
        steps = [{"step": 1, "start": "first", "ready_s": first}]
        steps += [{"step": i, "start": "warm", "ready_s": s} for i, s in enumerate(warm, 2)]
        return {"scenario": "start", "steps": steps, "first_start_s": first, "warm_start_s": statistics.median(warm)}

    slow, quick = run(2.0, 0.9, 0.8), run(1.6, 0.6, 0.5)
    assert _best([slow, quick]) is quick and _best([quick, slow]) is quick
    ratios = report.ratios("start", quick, run(0.4, 0.1, 0.1))
    assert ratios["first_start_s"] == 4.0 and ratios["warm_start_s"] == 5.5
    assert [(s["load"], s["ready_s"]) for s in ratios["steps"]] == [(1, 4.0), (2, 6.0), (3, 5.0)]
