"""Human output: the progress line while a run goes, the tables after it, and compare ratios."""

from __future__ import annotations

import statistics
import sys
import time

MESSAGE_COLUMNS = [
    ("step", "step", "{}"), ("offered", "offered_rate", "{:.0f}"), ("acked/s", "achieved_rate", "{:.0f}"),
    ("deliv/s", "deliveries_per_s", "{:.0f}"), ("µs/deliv", "server_cpu_us_per_delivery", "{:.2f}"),
    ("srv%", "server_cpu_pct", "{:.0f}"), ("db%", "db_cpu_pct", "{:.0f}"), ("db busy", "db_busy_pct", "{:.0f}"),
    ("rss MB", "server_rss_bytes", "mb"), ("p50", "latency_p50_ms", "{:.1f}"), ("p90", "latency_p90_ms", "{:.1f}"), ("p99", "latency_p99_ms", "{:.1f}"),
    ("p999", "latency_p999_ms", "{:.1f}"), ("max", "latency_max_ms", "{:.1f}"), ("ack p99", "ack_p99_ms", "{:.1f}"),
    ("err", "errors", "{}"), ("miss", "missing_deliveries", "{}"), ("slow", "slow_consumer_closes", "{}"),
    ("gc ms", "max_gc_pause_ms", "{:.1f}"), ("gc cpu", "max_gc_pause_cpu_ms", "{:.1f}"), ("load%", "loader_cpu_pct", "{:.0f}"),
    ("other%", "other_cpu_pct", "{:.0f}"), ("ok", "ok", "yn"),
]
IDLE_COLUMNS = [
    ("step", "step", "{}"), ("conns", "connections", "{}"), ("conn/s", "connect_rate", "{:.0f}"),
    ("conn p99", "connect_p99_ms", "{:.1f}"), ("rss MB", "server_rss_bytes", "mb"), ("B/conn", "rss_bytes_per_conn", "{:.0f}"),
    ("µs/conn", "server_cpu_us_per_conn", "{:.0f}"), ("µs/connect", "connect_server_cpu_us_per_conn", "{:.0f}"),
    ("srv% connecting", "connect_server_cpu_pct", "{:.0f}"), ("srv%", "server_cpu_pct", "{:.0f}"), ("db%", "db_cpu_pct", "{:.0f}"),
    ("ping p50", "latency_p50_ms", "{:.1f}"), ("p99", "latency_p99_ms", "{:.1f}"), ("max", "latency_max_ms", "{:.1f}"),
    ("err", "errors", "{}"), ("gc ms", "max_gc_pause_ms", "{:.1f}"), ("gc cpu", "max_gc_pause_cpu_ms", "{:.1f}"),
    ("load%", "loader_cpu_pct", "{:.0f}"), ("other%", "other_cpu_pct", "{:.0f}"),
]
DURABLE_EXTRA = [("senders", "senders", "{}")]
START_COLUMNS = [("step", "step", "{}"), ("start", "start", "{}"), ("ready s", "ready_s", "{:.3f}"), ("rss MB", "server_rss_bytes", "mb")]


class Progress:
    """One line on stderr, rewritten in place; silent when disabled (``--json``) or not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K{time.monotonic() - self.started:6.1f}s {text}"[:200])
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.0f}"
    if fmt == "yn":
        return "yes" if value else "NO"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def grid(rows: list[dict], columns: list[tuple[str, str, str]], lead: list[tuple[str, str]] = ()) -> str:
    heads = [h for h, _ in lead] + [h for h, _, _ in columns]
    body = [[str(row.get(k, "")) for _, k in lead] + [_cell(row.get(k), f) for _, k, f in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def columns_for(scenario: str) -> list:
    if scenario == "idle":
        return IDLE_COLUMNS
    if scenario == "start":
        return START_COLUMNS
    if scenario == "durable":
        return DURABLE_EXTRA + [c for c in MESSAGE_COLUMNS if c[1] != "offered_rate"]
    return MESSAGE_COLUMNS


def render(result: dict) -> str:
    lines = [f"chatd bench {result['scenario']} --target {result['target']}" + (" --quick" if result.get("quick") else "")]
    if result.get("error"):
        lines.append(f"ERROR: {result['error']}")
    lines.append(grid(result.get("steps", []), columns_for(result["scenario"])))
    lines.append(summary_line(result))
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    keys = ("saturation_deliveries_per_s", "max_sustained_deliveries_per_s", "committed_msgs_per_s", "rss_bytes_per_conn", "connect_rate", "idle_server_cpu_pct",
            "first_start_s", "warm_start_s", "warm_start_max_s",
            "disconnect_ping_max_ms", "disconnect_max_gc_pause_ms", "stopped", "duration_s")
    return "  ".join(f"{k}={result[k]}" for k in keys if result.get(k) is not None)


def render_compare(compare: dict) -> str:
    scenario = compare["scenario"]
    rows = []
    for name, runs in compare["runs"].items():
        for run in runs:
            for step in run.get("steps", []):
                rows.append({"target": name, **step})
            if run.get("error"):
                rows.append({"target": f"{name} (error: {run['error'][:60]})"})
    lines = [f"chatd bench compare {scenario}" + (" --quick" if compare.get("quick") else ""), grid(rows, columns_for(scenario), [("target", "target")]), ""]
    for name, runs in compare["runs"].items():
        for run in runs:
            lines.append(f"{name}: {summary_line(run)}")
    lines.append("")
    for name, ratio in compare["ratios"].items():
        lines.append(f"chatd/{name}: " + "  ".join(f"{k}={v}" for k, v in ratio.items() if k != "steps"))
    return "\n".join(lines)


def _ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def _step_key(scenario: str, step: dict):
    if scenario == "durable":
        return step.get("senders")
    return step.get("step") if scenario in ("idle", "start") else step.get("offered_rate")


def ratios(scenario: str, chatd: dict, peer: dict) -> dict:
    """chatd/peer for the headline figures and for each step both ran (matched by load)."""
    out: dict = {key: _ratio(chatd.get(key), peer.get(key)) for key in (
        "saturation_deliveries_per_s", "max_sustained_deliveries_per_s", "committed_msgs_per_s", "rss_bytes_per_conn", "connect_rate",
        "first_start_s", "warm_start_s")
        if chatd.get(key) is not None or peer.get(key) is not None}
    theirs = {_step_key(scenario, s): s for s in peer.get("steps", [])}
    steps = []
    for mine in chatd.get("steps", []):
        other = theirs.get(_step_key(scenario, mine))
        if other is None:
            continue
        keys = ("rss_bytes_per_conn", "connect_rate", "latency_p99_ms", "server_cpu_us_per_conn") if scenario == "idle" else (
            ("ready_s",) if scenario == "start" else
            ("deliveries_per_s", "server_cpu_us_per_delivery", "latency_p50_ms", "latency_p99_ms", "achieved_rate"))
        steps.append({"load": _step_key(scenario, mine), **{k: _ratio(mine.get(k), other.get(k)) for k in keys}})
    out["steps"] = steps
    for key in ("server_cpu_us_per_delivery", "latency_p99_ms", "server_cpu_us_per_conn"):
        values = [s[key] for s in steps if s.get(key) is not None]
        if values:
            out[f"median_{key}"] = round(statistics.median(values), 3)
    return out
