"""The collector's schedule (chatd.collector): young survivors frozen by time and by work, cycles still reclaimed."""

from __future__ import annotations

import gc
import weakref

import trio

from chatd import collector


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


async def _wait_until(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def _young(objects: list) -> bool:
    young = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    return any(id(o) in young for o in objects)


async def test_young_survivors_are_frozen_and_the_thresholds_restored_on_exit():
    before = gc.get_threshold()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.manage, 0.01, 0)
            await _wait_until(lambda: gc.get_threshold() == (before[0], collector.YOUNG_PASSES_PER_GEN1, before[2]))
            frozen = gc.get_freeze_count()
            survivors = [[i] for i in range(5000)]
            await _wait_until(lambda: gc.get_freeze_count() >= frozen + len(survivors))
            assert not _young(survivors)
            nursery.cancel_scope.cancel()
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


async def test_a_burst_of_commands_runs_a_young_pass_before_the_timer_does():
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.manage, 3600, 0)  # the timer never fires in this test
            await _wait_until(lambda: gc.get_threshold()[1] == collector.YOUNG_PASSES_PER_GEN1)
            survivors = [[i] for i in range(100)]
            for _ in range(collector.COMMANDS_PER_PASS - 1):
                collector.command_done()
            assert _young(survivors)
            collector.command_done()
            assert not _young(survivors)
            nursery.cancel_scope.cancel()
        survivors = [[i] for i in range(100)]
        for _ in range(2 * collector.COMMANDS_PER_PASS):
            collector.command_done()  # the schedule is not running: no passes
        assert _young(survivors)
    finally:
        gc.unfreeze()


async def test_a_frozen_cycle_is_reclaimed_by_the_full_pass():
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.manage, 0.01, 0.2)
            node = _Node()
            ref = weakref.ref(node)
            frozen = gc.get_freeze_count()
            await _wait_until(lambda: gc.get_freeze_count() > frozen)
            del node
            gc.collect(1)  # a young pass does not reach it: it is frozen
            assert ref() is not None
            await _wait_until(lambda: ref() is None)
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
