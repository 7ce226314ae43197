"""Opening a checkpoint: `tf.train.load_checkpoint`, with TensorFlow's read failures turned into one named error.

TensorFlow reports a damaged checkpoint from whichever call first touches the damage, in its own words and without
saying which checkpoint it was reading:

- an empty, truncated or overwritten `.index` fails as the reader opens ("not an sstable", "file is too short");
- a missing `.data` file fails on the first tensor read ("...data-00000-of-00001; No such file or directory");
- a truncated `.data` file fails only when a tensor stored past the cut is read ("Read less bytes than requested",
  an OutOfRange status that the checkpoint reader raises as `IndexError`);
- flipped bytes fail that tensor's checksum ("Checksum does not match").

`open_index` opens a checkpoint and returns its `CheckpointIndex`: a reader whose tensor reads translate the same way
(so the error names the checkpoint, which half of the export it is (training or EMA), the file and the fix), with the
object graph, shape and dtype maps and node paths every stage looks things up in. Within `one_export` (the pipeline
runs its read stages inside it) each checkpoint is opened once and its index shared by restore and every layout.
`read_checkpoints` is the read stage itself: it opens the pair of checkpoints an export reads and returns them as one
`CheckpointIndexes`, the value every layout is handed. `reading` covers the other readers of the same files
(`tf.train.Checkpoint.read`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ema_export.checkpoint_graph import node_paths, read_object_graph
from ema_export.errors import CheckpointReadError, received_line

if TYPE_CHECKING:
    from ema_export.locate import CheckpointSources

ROLE_TRAINING = "training"
ROLE_EMA = "EMA"
_FLAGS = {ROLE_TRAINING: "CKPT_DIR", ROLE_EMA: "--ema-checkpoint"}

# Exceptions TensorFlow's checkpoint readers raise for unreadable files (OutOfRange surfaces as IndexError, and
# some C++ paths still raise RuntimeError).
_READ_FAILURES = (tf.errors.OpError, IndexError, RuntimeError)


class CheckpointReader:
    """A `tf.train.CheckpointReader` for one checkpoint whose tensor reads raise `CheckpointReadError`.

    It offers the reader's methods the stages use; anything else is passed through unchanged.
    """

    def __init__(self, reader: Any, prefix: str, role: str) -> None:
        self._reader = reader
        self.prefix = prefix
        self.role = role

    def get_tensor(self, key: str) -> Any:
        with reading(self.prefix, self.role):
            return self._reader.get_tensor(key)

    def has_tensor(self, key: str) -> bool:
        return bool(self._reader.has_tensor(key))

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return self._reader.get_variable_to_shape_map()

    def get_variable_to_dtype_map(self) -> dict[str, tf.DType]:
        return self._reader.get_variable_to_dtype_map()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


@dataclass(frozen=True)
class CheckpointIndex:
    """One opened checkpoint and what the stages look up in it, read once.

    The shape and dtype maps come from the `.index` file; the object graph (a tensor in the data file) is parsed on
    first use, so a checkpoint whose graph is never needed does not pay for it, and a damaged data file fails where it
    failed before: at the first read that needs it.
    """

    prefix: str
    role: str
    reader: CheckpointReader = field(repr=False)
    shapes: dict[str, list[int]] = field(repr=False)
    dtypes: dict[str, tf.DType] = field(repr=False)

    @functools.cached_property
    def graph(self) -> trackable_object_graph_pb2.TrackableObjectGraph | None:
        """The object graph, or None for a name-based (TF1 Saver) checkpoint."""
        return read_object_graph(self.reader)

    @functools.cached_property
    def node_paths(self) -> dict[int, tuple[str, ...]]:
        """Breadth-first path of every object-graph node from the root (empty without a graph)."""
        return node_paths(self.graph) if self.graph is not None else {}


_LOADS = 0
_OPEN: contextvars.ContextVar[dict[tuple[str, str], CheckpointIndex] | None] = contextvars.ContextVar(
    "ema_export_open_indexes", default=None)


def load_count() -> int:
    """How many times this process opened a checkpoint with `tf.train.load_checkpoint` (tests count opens)."""
    return _LOADS


def _load(prefix: str) -> Any:
    global _LOADS
    _LOADS += 1
    return tf.train.load_checkpoint(prefix)


@contextlib.contextmanager
def one_export() -> Iterator[None]:
    """Share one `CheckpointIndex` per (prefix, role) among everything run inside, for the duration of one export.

    Usable as a decorator. Nested uses share the outer cache; outside any, `open_index` opens afresh each time (the
    files may change between exports).
    """
    if _OPEN.get() is not None:
        yield
        return
    token = _OPEN.set({})
    try:
        yield
    finally:
        _OPEN.reset(token)


def open_index(prefix: str | os.PathLike, role: str) -> CheckpointIndex:
    """The `CheckpointIndex` of the checkpoint at `prefix`: opened once per export (see `one_export`).

    Raises:
        CheckpointReadError: The index is missing, empty or not a checkpoint index.
    """
    prefix = os.fspath(prefix)
    cache = _OPEN.get()
    if cache is not None and (prefix, role) in cache:
        return cache[(prefix, role)]
    # The same file may be read in two roles (the inversion check reads the EMA checkpoint as a training one): the
    # TensorFlow reader is shared, the index (whose errors name the role) is one per role.
    same_file = next((known for (path, _), known in (cache or {}).items() if path == prefix), None)
    with reading(prefix, role):
        raw = same_file.reader._reader if same_file is not None else _load(prefix)
        index = CheckpointIndex(prefix, role, CheckpointReader(raw, prefix, role),
                                raw.get_variable_to_shape_map(), raw.get_variable_to_dtype_map())
    if cache is not None:
        cache[(prefix, role)] = index
    return index


@dataclass(frozen=True)
class CheckpointIndexes:
    """What the read stage opened for one export: the checkpoints every layout looks for shadows in.

    Training saves either a TensorFlow checkpoint (then `training` is its index) or one of Keras's own files, a
    `.keras` archive or a `.weights.h5` file (then `keras_file` is its path). A Keras file is HDF5 that
    `ema_export.keras_files` reads, not a TensorFlow checkpoint, so it has no index; exactly one of the two is set.

    Attributes:
        training: The training checkpoint's index, or None when training saved a Keras file.
        ema: The separate EMA checkpoint's index (`CKPT_DIR/ema/`, `--ema-checkpoint`), or None when there is none
            and the shadows, if any, are in the training source.
        keras_file: The `.keras` / `.weights.h5` file training saved, or None for a TensorFlow checkpoint.

    Example:
        >>> indexes = read_checkpoints(locate("runs/7"))
        >>> indexes.ema.graph  # the EMA checkpoint's object graph, parsed once
    """

    training: CheckpointIndex | None
    ema: CheckpointIndex | None
    keras_file: str | None = None

    def __post_init__(self) -> None:
        if (self.training is None) == (self.keras_file is None):
            raise ValueError("CheckpointIndexes holds either a training index or a Keras file, exactly one: got "
                             f"training={self.training!r}, keras_file={self.keras_file!r}")

    @property
    def training_source(self) -> str:
        """The training checkpoint's prefix or the Keras file's path: what messages name as the training source."""
        return self.training.prefix if self.training is not None else str(self.keras_file)

    def nearby(self, prefix: str | os.PathLike) -> CheckpointIndex:
        """The index of another checkpoint, read as a training checkpoint: the inversion check compares a
        checkpoint with those of the same step around it. Within the export, a checkpoint already read (these two
        included) is not opened again.

        Raises:
            CheckpointReadError: The index is missing, empty or not a checkpoint index.
        """
        return open_index(prefix, ROLE_TRAINING)


def read_checkpoints(sources: CheckpointSources) -> CheckpointIndexes:
    """The read stage: open the training and EMA checkpoints an export reads, once, as the value layouts are given.

    An EMA checkpoint is always a TensorFlow checkpoint: one given as a Keras file fails here, as an unreadable
    checkpoint.

    Raises:
        CheckpointReadError: A checkpoint's index is missing, empty or not a checkpoint index.
    """
    keras_file = sources.training.prefix if sources.training.is_keras_file else None
    training = open_index(sources.training.prefix, ROLE_TRAINING) if keras_file is None else None
    ema = open_index(sources.ema.prefix, ROLE_EMA) if sources.ema is not None else None
    return CheckpointIndexes(training, ema, keras_file)


@contextlib.contextmanager
def reading(prefix: str | os.PathLike, role: str) -> Iterator[None]:
    """Turn TensorFlow's failures while reading the checkpoint at `prefix` into `CheckpointReadError`."""
    try:
        yield
    except _READ_FAILURES as error:
        raise checkpoint_read_error(os.fspath(prefix), role, error) from error


def read_entry(prefix: str, role: str, key: str, dtype: tf.DType, slice_spec: str = "") -> tf.Tensor:
    """One entry of the `role` checkpoint at `prefix`, or the slice of it `slice_spec` names (a `RestoreV2`
    `shape_and_slices` entry such as "100 4 0,50:-"), read by TensorFlow's restore op; failures as `reading` says."""
    with reading(prefix, role):
        return tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[key], shape_and_slices=[slice_spec],
                                    dtypes=[dtype])[0]


def checkpoint_read_error(prefix: str, role: str, error: BaseException) -> CheckpointReadError:
    """The one-line error for a failed read of the `role` checkpoint at `prefix`, from TensorFlow's `error`."""
    detail = received_line(error).removesuffix(" [Op:RestoreV2]")
    index = prefix + ".index"
    data = _data_files(prefix)
    fix = (f"Copy the {role} checkpoint again from where training wrote it, or export another step with --step N "
           f"(the {role} checkpoint comes from {_FLAGS.get(role, 'CKPT_DIR')})")
    if not os.path.exists(index):
        what = f"its index {index} is missing"
    elif "sstable" in detail or "Unable to open table file" in detail or os.path.getsize(index) == 0:
        size = os.path.getsize(index)
        what = (f"its index {index} is {'empty' if size == 0 else f'not a checkpoint index ({size} bytes)'}: "
                f"truncated or overwritten")
    elif "No such file" in detail:
        what = f"its data file is missing ({detail})"
    elif isinstance(error, IndexError) or "Read less bytes" in detail:
        what = f"its data file {data} is shorter than its index says: truncated (an incomplete copy or a full disk)"
    elif "checksum does not match" in detail.lower():
        what = f"its data file {data} is corrupt: the stored bytes fail their checksum"
    else:
        what = "TensorFlow's checkpoint reader failed on it"
    return CheckpointReadError(f"The {role} checkpoint {prefix} cannot be read: {what}. Received: {detail}",
                               hint=fix)


def _data_files(prefix: str) -> str:
    found = sorted(glob.glob(glob.escape(prefix) + ".data-*"))
    return ", ".join(found) if found else f"{prefix}.data-*"
