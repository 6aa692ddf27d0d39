"""Latency histograms that loaders fill cheaply and the orchestrator merges.

A value (microseconds, int >= 0) maps to a bucket index with integer operations only:
values below 256 are exact; above, the top 8 significant bits are kept (relative
error < 0.8 %), HDR-histogram style. Loaders keep a flat list of counts and send the
non-zero ones as ``{index: count}``; percentiles come from the merged counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SIZE = 128 * 64  # covers every int64 microsecond value


def bucket(us: int) -> int:
    """Bucket index of a non-negative microsecond value (inlined in the loader's hot path)."""
    if us < 256:
        return us if us > 0 else 0
    shift = us.bit_length() - 8
    return (shift << 7) + (us >> shift)


def bucket_value(index: int) -> float:
    """The middle of bucket ``index``, in microseconds."""
    if index < 256:
        return float(index)
    shift = (index >> 7) - 1
    low = (index - (shift << 7)) << shift
    return low + ((1 << shift) - 1) / 2


def new() -> list[int]:
    return [0] * SIZE


def sparse(counts: list[int]) -> dict[str, int]:
    """Non-zero buckets, JSON-ready (keys are strings)."""
    return {str(i): c for i, c in enumerate(counts) if c}


def merge(parts: Iterable[Mapping[str, int]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for part in parts:
        for key, count in part.items():
            i = int(key)
            total[i] = total.get(i, 0) + count
    return total


def percentiles(counts: Mapping[int, int], qs: Iterable[float] = (0.5, 0.9, 0.99, 0.999), max_us: int | None = None) -> dict[str, float | None]:
    """``{"p50": ms, ..., "max": ms, "n": samples}`` from merged bucket counts.

    ``max_us`` (exact, tracked by the loaders) replaces the max bucket's midpoint.
    Every value is None when there are no samples.
    """
    n = sum(counts.values())
    keys = [_key(q) for q in qs]
    if n == 0:
        return {**{k: None for k in keys}, "max": None, "n": 0}
    ordered = sorted(counts.items())
    out: dict[str, float | None] = {}
    for q, key in zip(qs, keys):
        rank = max(1, int(q * n + 0.999999))  # the smallest value with at least q*n samples at or below it
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                out[key] = round(bucket_value(index) / 1000, 3)
                break
    top = max_us if max_us is not None else bucket_value(ordered[-1][0])
    out["max"] = round(top / 1000, 3)
    out["n"] = n
    return out


def _key(q: float) -> str:
    digits = f"{q * 100:g}".replace(".", "")
    return f"p{digits}"
