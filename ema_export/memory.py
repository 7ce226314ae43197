"""Memory handling for an export, kept out of the stages: the garbage collector's scope and when it runs.

An export holds a model several times over (live, averaged, the copy reloaded for verification); these helpers keep
the peak down without the pipeline code knowing how.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
