"""Memory handling for an export, kept out of the stages: the garbage collector's scope and when it runs, and
reading ahead with a bounded number of values in flight.

An export holds a model several times over (live, averaged, the copy reloaded for verification); these helpers keep
the peak down without the pipeline code knowing how.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import tensorflow as tf

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def collect_only_new_objects() -> Iterator[None]:
    """Set aside from garbage collection every object that exists on entry (TensorFlow's and Keras's own).

    The collection `release` runs then scans only what the export created. Nested uses (an export inside a caller
    that already froze) leave the caller's freeze alone.
    """
    frozen_here = gc.get_freeze_count() == 0
    if frozen_here:
        gc.freeze()
    try:
        yield
    finally:
        if frozen_here:
            gc.unfreeze()


def release() -> None:
    """Free what the caller just dropped (the in-memory models hold reference cycles), before the next large load."""
    gc.collect()


def tensor_bytes(shape: Any, dtype: Any) -> int:
    """Bytes a tensor of `shape` and `dtype` holds, for planning reads and writes (a string element counts as one)."""
    return (tf.TensorShape(shape).num_elements() or 0) * max(tf.as_dtype(dtype).size, 1)


def large_enough(sizes: list[int], min_bytes: int, min_mean_bytes: int) -> bool:
    """Whether tensors of these byte `sizes` are worth splitting work over threads: at least `min_bytes` in all and
    `min_mean_bytes` each on average (per-op costs outweigh the gain on many small tensors)."""
    total = sum(sizes)
    return bool(sizes) and total >= min_bytes and total >= min_mean_bytes * len(sizes)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def read_ahead(function: Callable[[T], R], items: Iterable[T], ahead: int = 2) -> Iterator[R]:
    """`function(item)` for each item, in order, computed by `ahead` worker threads up to `ahead` items ahead.

    For reads that spend their time in TensorFlow ops and numpy, which release the GIL: on two cores two values are
    read at once. At most `ahead` results exist beyond the one being consumed, which bounds the memory in flight.
    With `ahead` 1 the calls run in this thread, one by one.
    """
    if ahead <= 1:
        yield from map(function, items)  # in this thread: no worker's memory arena holds what it read
        return
    remaining = iter(items)
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending = deque(pool.submit(function, item) for item in itertools.islice(remaining, ahead))
        while pending:
            done = pending.popleft()
            for item in itertools.islice(remaining, 1):
                pending.append(pool.submit(function, item))
            yield done.result()
            del done

