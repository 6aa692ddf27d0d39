"""CPython's cyclic collector, paced for a process that holds tens of thousands of connections.

A full collection walks every tracked object; with tens of thousands of connections that
stalls the loop for around a second (DESIGN.md §8). So the young generations are
collected often and what survived them is moved to the permanent generation with
``gc.freeze()`` (O(1)): full collections then only walk what is new, and a rare full
pass over everything (``server.gc_full_interval``) reclaims frozen garbage cycles.

A young pass costs in proportion to what is young, and under load that is set by work,
not by CPython's counters: every frozen object that dies (a finished request) takes one
off the generation-0 count, so the automatic passes come late and large. Hence a young
pass every ``server.gc_freeze_interval`` seconds *and* after every
:data:`COMMANDS_PER_PASS` commands (a burst of commands arrives faster than a timer on a
busy loop fires), and generation 1 collected after 3 young passes instead of 10
(docs/decisions.md, "The collector").
"""

from __future__ import annotations

import gc

import trio

YOUNG_PASSES_PER_GEN1 = 3  # CPython's default is 10
COMMANDS_PER_PASS = 256  # ~20 tracked objects each: a pass over ~5,000 young objects

_commands = 0
_per_pass = 0  # 0 while :func:`manage` is not running: commands then drive no passes


def command_done() -> None:
    """Count one handled command; every :data:`COMMANDS_PER_PASS` of them, a young pass."""
    global _commands
    _commands += 1
    if _commands >= _per_pass > 0:
        young_pass()


def young_pass() -> None:
    """Collect the young generations and freeze what survived them."""
    global _commands
    _commands = 0
    gc.collect(1)
    gc.freeze()


async def manage(freeze_interval: float, full_interval: float) -> None:
    """Run the schedule until cancelled; CPython's thresholds are restored on the way out.

    ``freeze_interval`` 0 freezes once at start and runs no passes of its own.
    """
    global _commands, _per_pass
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], YOUNG_PASSES_PER_GEN1, threshold[2])
    try:
        if freeze_interval <= 0:
            await trio.sleep_forever()
        _commands, _per_pass = 0, COMMANDS_PER_PASS
        last_full = trio.current_time()
        while True:
            await trio.sleep(freeze_interval)
            if full_interval and trio.current_time() - last_full >= full_interval:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                last_full = trio.current_time()
            else:
                young_pass()
    finally:
        _per_pass = 0
        gc.set_threshold(*threshold)
