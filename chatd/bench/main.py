"""``chatd bench``: start a server, drive load from separate processes, report per step.

    chatd bench SCENARIO [--target T] [--json] [--quick]
    chatd bench compare SCENARIO [--targets T,T,...] [--rounds N] [--json] [--quick]

SCENARIO is one of fanout, dm, durable, idle, mixed, start; T one of chatd (default), ws, socketio,
pysocketio. The bench starts the target itself (chatd on a fresh embedded PostgreSQL,
or a peer from bench/peers/ whose packages it installs into its work directory),
stops everything it started, and prints a table (with a progress line on stderr while
it runs) or, with --json, exactly one JSON object on stdout. Figures and the method
are described in docs/performance.md. Exit status: 0 done, 1 the run failed, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from chatd.bench import procstat, report, targets
from chatd.bench.fleet import BenchError, Fleet
from chatd.bench.scenarios import SCENARIOS
from chatd.bench.steps import Context, max_sustained, saturation

QUICK_LIMIT = 100.0  # seconds of stepping in --quick mode (set-up and stop come on top)
FULL_LIMIT = 600.0


def default_work_dir() -> Path:
    from chatd.bench.peers import ROOT

    return Path(os.environ.get("CHATD_BENCH_WORK", ROOT / "bench-work"))


def run_one(scenario_name: str, target_name: str, args: argparse.Namespace, progress) -> dict:
    """One scenario against one target; always returns a result (with ``error`` on failure)."""
    scenario = SCENARIOS[scenario_name]()
    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.work_dir) / f"run-{stamp}-{os.getpid()}"
    result: dict = {
        "scenario": scenario_name, "target": target_name, "quick": args.quick,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": procstat.machine(), "setup": {}, "steps": [],
    }
    target = fleet = None
    limit = args.max_seconds or (QUICK_LIMIT if args.quick else FULL_LIMIT)
    try:
        target = targets.make(target_name, work, Path(args.work_dir) / "peers")
        n = 0
        if getattr(scenario, "uses_loaders", True):  # `start` starts the server itself, and no load
            progress(f"[{target_name}] starting the server")
            target.start()
            n = args.loaders or scenario.loaders(args.quick)
            fleet = Fleet(n, proto=target.proto, port=target.port, path=target.path, secret=targets.SECRET,
                          max_seconds=limit + 600, log_dir=target.work)
        ctx = Context(target, fleet, args.quick, time.monotonic() + limit, progress, target.work)
        result["setup"] = ctx.setup
        result["setup"]["loaders"] = n
        result["steps"] = scenario.run(ctx)
        result.update(ctx.summary)
    except BenchError as exc:
        result["error"] = str(exc)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    finally:
        progress(f"[{target_name}] stopping")
        if fleet is not None:
            fleet.stop()
        if target is not None:
            target.stop()
    steps = result["steps"]
    result["saturation_deliveries_per_s"] = saturation(steps) if scenario_name != "idle" else None
    result["max_sustained_deliveries_per_s"] = max_sustained(steps) if scenario_name != "idle" else None
    if scenario_name == "idle" and steps:
        result["rss_bytes_per_conn"] = steps[-1]["rss_bytes_per_conn"]
        result["connect_rate"] = max(s["connect_rate"] for s in steps)
    if scenario_name == "durable" and steps:
        result["committed_msgs_per_s"] = max(s["achieved_rate"] for s in steps)
    for key in ("max_gc_pause_ms", "max_gc_pause_cpu_ms"):
        result[key] = max((s[key] for s in steps if s.get(key) is not None), default=None)
    result["duration_s"] = round(time.monotonic() - started, 1)
    if not args.keep and "error" not in result:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work_dir"] = str(work)
    return result


def cmd_run(args: argparse.Namespace) -> int:
    progress = report.Progress(not args.json)
    result = run_one(args.scenario, args.target, args, progress)
    progress.done()
    print(json.dumps(result, indent=2) if args.json else report.render(result))
    return 1 if result.get("error") else 0


def cmd_compare(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if "chatd" not in names:
        names.insert(0, "chatd")
    progress = report.Progress(not args.json)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):  # alternate: chatd, peer, peer, ... then again
        for name in names:
            runs[name].append(run_one(args.scenario, name, args, progress))
    progress.done()
    best = {n: _best(rs) for n, rs in runs.items()}
    compare = {
        "scenario": args.scenario, "quick": args.quick, "rounds": args.rounds, "order": names,
        "machine": procstat.machine(), "runs": runs,
        "ratios": {n: report.ratios(args.scenario, best["chatd"], best[n]) for n in names if n != "chatd"},
    }
    print(json.dumps(compare, indent=2) if args.json else report.render_compare(compare))
    return 1 if any(r.get("error") for rs in runs.values() for r in rs) else 0


def _best(results: list[dict]) -> dict:
    good = [r for r in results if not r.get("error")] or results
    if good[0].get("scenario") == "start":  # the quickest round
        return min(good, key=lambda r: r.get("warm_start_s") or float("inf"))
    return max(good, key=lambda r: (r.get("saturation_deliveries_per_s") or 0, r.get("max_sustained_deliveries_per_s") or 0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatd bench", description="Benchmarks of chatd and peer servers (docs/performance.md).")
    p.add_argument("scenario", help=f"{' | '.join(SCENARIOS)} | compare")
    p.add_argument("compare_scenario", nargs="?", help="with `compare`: the scenario to compare")
    p.add_argument("--target", default="chatd", choices=targets.TARGETS)
    p.add_argument("--targets", default=",".join(targets.TARGETS), help="compare: comma-separated targets (chatd always runs)")
    p.add_argument("--rounds", type=int, default=1, help="compare: how many alternating rounds (best round reported per target)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.add_argument("--quick", action="store_true", help="a small run that finishes in under 2 minutes (CI smoke)")
    p.add_argument("--loaders", type=int, help="load processes (default per scenario)")
    p.add_argument("--max-seconds", type=float, help="no new step starts after this many seconds")
    p.add_argument("--work-dir", default=None, help="where servers, logs and peer packages go (default ./bench-work)")
    p.add_argument("--keep", action="store_true", help="keep the run's work directory (logs, config)")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.work_dir = args.work_dir or str(default_work_dir())
    if args.scenario == "compare":
        if args.compare_scenario not in SCENARIOS:
            p.error(f"compare needs a scenario: {', '.join(SCENARIOS)}")
        args.scenario = args.compare_scenario
        runner = cmd_compare
    elif args.scenario in SCENARIOS and args.compare_scenario is None:
        runner = cmd_run
    else:
        p.error(f"unknown scenario {args.scenario!r}: {', '.join(SCENARIOS)} or compare SCENARIO")
    if args.rounds < 1 or (args.loaders is not None and args.loaders < 1):
        p.error("--rounds and --loaders must be at least 1")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    try:
        return runner(args)
    except BenchError as exc:
        print(f"chatd bench: {exc}", file=sys.stderr)
        return 1
