"""`memory.read_ahead`: results in order, computed at most `ahead` items ahead, in worker threads only when asked."""

from __future__ import annotations

import threading
import time

import pytest

from ema_export.memory import read_ahead


def test_results_come_in_order_with_at_most_ahead_items_in_flight():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.01 * (5 - item % 5))  # later items finish first
        return item * item

    consumed = []
    for result in read_ahead(slow_square, range(10), ahead=2):
        with lock:
            # when the k-th result is handed over, at most the next `ahead` items have been started
            assert len(started) <= len(consumed) + 1 + 2
        consumed.append(result)
    assert consumed == [item * item for item in range(10)]


def test_ahead_one_reads_in_this_thread_and_two_in_workers():
    def thread_of(_: int) -> int:
        return threading.get_ident()

    assert set(read_ahead(thread_of, range(3), ahead=1)) == {threading.get_ident()}
    assert threading.get_ident() not in set(read_ahead(thread_of, range(3), ahead=2))


def test_an_error_is_raised_at_its_item_after_the_ones_before_it():
    def fails_at_three(item: int) -> int:
        if item == 3:
            raise ValueError("item 3")
        return item

    consumed = []
    with pytest.raises(ValueError, match="item 3"):
        for result in read_ahead(fails_at_three, range(6), ahead=2):
            consumed.append(result)
    assert consumed == [0, 1, 2]
