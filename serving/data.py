"""Evaluation data for ``compare``, as a stream of batches: numpy files, TFRecord files of tf.Example, or any iterable.

Why a stream: a real evaluation set does not fit in memory (ImageNet's validation images as float32 are 30 GB).
Every source yields ``Batch`` objects of at most ``batch_size`` rows with their row numbers; ``compare`` sends each and
folds the answers into its statistics, so memory holds a few batches whatever the data set's size. ``.npy`` files and
the members of ``.npz`` files written by ``np.savez`` (stored, not compressed) are memory-mapped; members of
``np.savez_compressed`` files cannot be and are read whole, so big compressed sets belong in TFRecord.

Sharding (``Shard``): shard ``I`` of ``N`` takes the rows (records) whose number ``r`` has ``r % N == I``, counting
over the files in the order given, so ``N`` processes split one data set without coordination.
"""

from __future__ import annotations

import glob
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.client import SignatureSpec
from serving.codec import SUPPORTED_DTYPES, numpy_dtype
from serving.protocol import DataError
from serving.tfrecord import Compression, CorruptionLog, ExampleDecoder, read_records

NUMPY_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class Batch:
    """Input rows named like the signature's inputs, their labels (or None), and each row's number in the data set."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    rows: np.ndarray

    @property
    def num_rows(self) -> int:
        """How many rows the batch holds."""
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class Shard:
    """Which part of the data this process takes: rows ``r`` with ``r % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise DataError(
                f"Invalid shard {self.index}/{self.count}. Expected I/N with 0 <= I < N (--shard 0/4 ... 3/4); fix "
                f"--shard. Received: {self.index}/{self.count}."
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` -> ``Shard(I, N)``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise DataError(
                f"Invalid shard {text!r}. Expected I/N, e.g. 0/4 for the first of four shards; fix --shard. "
                f"Received: {text!r}."
            ) from None
        return cls(index, count)

    def to_dict(self) -> dict[str, int]:
        """``{"index": I, "count": N}``."""
        return {"index": self.index, "count": self.count}


class DataSource(Protocol):
    """What ``compare`` reads: batches, a description for the report, and how many corrupt records it skipped."""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield batches of at most ``batch_size`` rows, in row order."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON description (kind, files, shard), recorded in the report so ``merge`` can check shards match."""
        ...

    @property
    def num_corrupt(self) -> int:
        """Corrupt records skipped so far (TFRecord with ``skip_corrupt``)."""
        ...


# ------------------------------------------------------------------------------------------------------ numpy arrays
@dataclass(frozen=True)
class ArraySource:
    """Arrays with one row per example (in memory or memory-mapped); each batch is cast to the signature's dtypes."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    dtypes: Mapping[str, np.dtype] = field(default_factory=dict)
    shard: Shard = Shard()
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = {int(np.shape(array)[0]) for array in self.inputs.values()}
        if len(sizes) != 1:
            raise DataError(
                "Inputs must share their first (batch) dimension. Expected one row per example in every input; fix "
                f"the arrays. Received: sizes {sorted(sizes)}."
            )
        if self.labels is not None and len(self.labels) != next(iter(sizes)):
            raise DataError(
                f"There must be one label per example. Expected {next(iter(sizes))} labels; fix the labels array "
                f"(--labels). Received: {len(self.labels)} labels."
            )

    @property
    def num_examples(self) -> int:
        """Rows in the whole data set (all shards)."""
        return int(np.shape(next(iter(self.inputs.values())))[0])

    @property
    def num_corrupt(self) -> int:
        """Arrays have no corrupt records."""
        return 0

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Slices of the shard's rows; only the batch is read from a memory-mapped file."""
        rows = np.arange(self.shard.index, self.num_examples, self.shard.count)
        for start in range(0, rows.size, batch_size):
            chosen = rows[start : start + batch_size]
            index: slice | np.ndarray = (
                slice(int(chosen[0]), int(chosen[-1]) + 1) if self.shard.count == 1 else chosen
            )
            inputs = {name: self._cast(name, np.asarray(array[index])) for name, array in self.inputs.items()}
            labels = None if self.labels is None else np.asarray(self.labels[index])
            yield Batch(inputs, labels, chosen)

    def describe(self) -> dict[str, Any]:
        """Kind, files and shard."""
        return {"kind": "numpy", "files": list(self.files), "shard": self.shard.to_dict()}

    def _cast(self, name: str, array: np.ndarray) -> np.ndarray:
        dtype = self.dtypes.get(name)
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)


# -------------------------------------------------------------------------------------------------------- TFRecord
@dataclass
class TFRecordSource:
    """TFRecord files of tf.Example, read record by record; every record is checked, only the shard's are parsed."""

    paths: tuple[str, ...]
    decoder: ExampleDecoder
    compression: Compression = "auto"
    skip_corrupt: bool = False
    shard: Shard = Shard()
    log: CorruptionLog = field(default_factory=CorruptionLog)

    @property
    def num_corrupt(self) -> int:
        """Corrupt records skipped so far."""
        return self.log.num_corrupt

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Decode the shard's records and stack them into batches."""
        rows: list[dict[str, np.ndarray]] = []
        labels: list[Any] = []
        numbers: list[int] = []
        for number, record in enumerate(self._records()):
            if number % self.shard.count != self.shard.index:
                continue
            inputs, label = self.decoder.decode(record)
            rows.append(inputs)
            labels.append(label)
            numbers.append(number)
            if len(numbers) == batch_size:
                yield self._stack(rows, labels, numbers)
                rows, labels, numbers = [], [], []
        if numbers:
            yield self._stack(rows, labels, numbers)

    def describe(self) -> dict[str, Any]:
        """Kind, files and shard."""
        return {"kind": "tfrecord", "files": list(self.paths), "shard": self.shard.to_dict()}

    def _records(self) -> Iterator[Any]:
        for path in self.paths:
            yield from read_records(path, compression=self.compression, skip_corrupt=self.skip_corrupt, log=self.log)

    def _stack(self, rows: list[dict[str, np.ndarray]], labels: list[Any], numbers: list[int]) -> Batch:
        inputs = {name: _stack_rows([row[name] for row in rows], name) for name in rows[0]}
        stacked_labels = None if self.decoder.labels_key is None else _stack_rows(labels, self.decoder.labels_key)
        return Batch(inputs, stacked_labels, np.asarray(numbers, dtype=np.int64))


def _stack_rows(values: list[Any], name: str) -> np.ndarray:
    try:
        return np.stack(values)
    except ValueError as error:
        shapes = sorted({tuple(np.shape(value)) for value in values})
        raise DataError(
            f"Feature {name!r} has rows of different shapes in one batch. Expected every example to have the same "
            f"number of values; fix the data or the signature's shape. Received shapes: {shapes[:5]}."
        ) from error


# ---------------------------------------------------------------------------------------------------- Python batches
@dataclass(frozen=True)
class IterableSource:
    """Any iterable of input batches (``{name: array}`` or ``({name: array}, labels)``), numbered as they come.

    Batches are re-cut to ``batch_size`` rows only when larger; smaller ones are sent as they are.
    """

    items: Iterable[Any]

    @property
    def num_corrupt(self) -> int:
        """Python batches have no corrupt records."""
        return 0

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The items as ``Batch`` objects."""
        next_row = 0
        for item in self.items:
            inputs, labels = item if isinstance(item, tuple) else (item, None)
            inputs = {name: np.asarray(array) for name, array in inputs.items()}
            size = ArraySource(inputs, None if labels is None else np.asarray(labels)).num_examples
            for start in range(0, size, batch_size):
                stop = min(start + batch_size, size)
                yield Batch(
                    {name: array[start:stop] for name, array in inputs.items()},
                    None if labels is None else np.asarray(labels)[start:stop],
                    np.arange(next_row + start, next_row + stop, dtype=np.int64),
                )
            next_row += size

    def describe(self) -> dict[str, Any]:
        """Kind only: an iterable has no files."""
        return {"kind": "python", "files": [], "shard": Shard().to_dict()}


# ------------------------------------------------------------------------------------------------------------ opening
@dataclass(frozen=True)
class DataOptions:
    """How to read ``--data``: labels name, TFRecord compression and corruption policy, and the shard to take."""

    labels_key: str | None = None
    compression: Compression = "auto"
    skip_corrupt: bool = False
    shard: Shard = Shard()


def expand_paths(patterns: Sequence[str]) -> tuple[str, ...]:
    """Each pattern's matches (sorted), in the order the patterns were given; a pattern matching nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        existing = [path for path in matches if Path(path).is_file()]
        if not existing:
            raise DataError(
                f"No data file matches {pattern!r}. Expected existing files or a glob matching some, e.g. "
                f"'val-*.tfrecord.gz'; fix --data. Received: {pattern!r}."
            )
        paths.extend(existing)
    return tuple(paths)


def open_data(patterns: Sequence[str], signature: SignatureSpec, options: DataOptions = DataOptions()) -> DataSource:
    """Open ``--data``: one ``.npy``/``.npz`` file, or TFRecord files of tf.Example (any other name).

    Raises:
        DataError: no file matches, numpy and TFRecord files are mixed, or a numpy file does not fit the signature.
    """
    paths = expand_paths(patterns)
    numpy_files = [path for path in paths if Path(path).suffix in NUMPY_SUFFIXES]
    if numpy_files:
        if len(paths) != 1:
            raise DataError(
                "--data takes one .npy/.npz file or any number of TFRecord files, not a mix or several numpy files. "
                f"Expected one kind; fix --data. Received: {list(paths)}."
            )
        dataset = load_dataset(paths[0], signature, labels_key=options.labels_key, cast=False)
        dtypes = {name: _target_dtype(signature, name) for name in dataset.inputs}
        return ArraySource(dataset.inputs, dataset.labels, {k: v for k, v in dtypes.items() if v is not None},
                           options.shard, paths)  # fmt: skip
    return TFRecordSource(paths, ExampleDecoder(signature, options.labels_key), options.compression,
                          options.skip_corrupt, options.shard)  # fmt: skip


def _target_dtype(signature: SignatureSpec, name: str) -> np.dtype | None:
    spec = signature.inputs[name]
    if spec.dtype in SUPPORTED_DTYPES and spec.dtype != "string":
        return numpy_dtype(spec.dtype)
    return None


# ----------------------------------------------------------------------------------------------------- numpy files
@dataclass(frozen=True)
class Dataset:
    """Inputs named like a signature's inputs (cast to its dtypes), optional labels, and the number of examples."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    num_examples: int


def load_dataset(
    path: str | Path,
    signature: SignatureSpec,
    *,
    labels_key: str | None = None,
    ignore_extra: bool = False,
    cast: bool = True,
) -> Dataset:
    """Read a ``.npz`` (arrays named like the signature's inputs, plus optional labels) or ``.npy`` (one input).

    Why validate here: a typo in an array name or a float64 file would otherwise surface as a server error per batch;
    every problem is collected and reported at once. Numeric arrays are cast to the signature's dtype when numpy
    calls that a same-kind cast (float64 -> float32), since ``np.savez`` defaults to float64 and int64. A ``.npy`` is
    memory-mapped; with ``cast=False`` it stays mapped (the caller casts batch by batch).

    Args:
        path: the ``.npz`` or ``.npy`` file.
        signature: the signature the inputs are for (from ``ServingClient.metadata``).
        labels_key: name of the labels array in the ``.npz``.
        ignore_extra: skip arrays that are not inputs (e.g. labels, when only predicting) instead of refusing them.
        cast: cast inputs to the signature's dtypes now (else only check that they can be).

    Raises:
        DataError: the file cannot be read, names are missing or unexpected, dtypes or shapes do not fit.
    """
    path = Path(path)
    arrays = _read_arrays(path, signature, labels_key)
    problems: list[str] = []
    labels = arrays.pop(labels_key) if labels_key is not None and labels_key in arrays else None
    if labels_key is not None and labels is None:
        problems.append(f"no labels array {labels_key!r} (--labels)")
    if ignore_extra:
        arrays = {name: array for name, array in arrays.items() if name in signature.inputs}
    missing = sorted(set(signature.inputs) - set(arrays))
    unexpected = sorted(set(arrays) - set(signature.inputs))
    if missing:
        problems.append(f"missing inputs {missing}")
    if unexpected:
        hint = " (pass --labels KEY for a labels array)" if labels_key is None else ""
        problems.append(f"unexpected arrays {unexpected}{hint}")
    names = sorted(set(arrays) & set(signature.inputs))
    inputs = {name: _fit(name, arrays[name], signature, problems, cast) for name in names}
    sizes = {name: array.shape[0] if array.ndim else None for name, array in inputs.items()}
    if labels is not None:
        sizes[labels_key or "labels"] = labels.shape[0] if labels.ndim else None
    if len(set(sizes.values())) > 1 or None in sizes.values():
        problems.append(f"arrays must share their first (batch) dimension, got {sizes}")
    if problems:
        raise DataError(
            f"{path.name} does not match signature {signature.name!r}: {'; '.join(problems)}. Expected arrays named "
            f"{sorted(signature.inputs)} with one row per example; fix the file or the flags. "
            f"Received: {sorted(arrays) + ([labels_key] if labels is not None else [])}."
        )
    num_examples = next(iter(sizes.values())) if sizes else 0
    return Dataset(inputs=inputs, labels=labels, num_examples=int(num_examples or 0))


def _read_arrays(path: Path, signature: SignatureSpec, labels_key: str | None) -> dict[str, np.ndarray]:
    try:
        # mmap_mode maps a .npy; numpy ignores it for .npz, whose stored members _npz_arrays maps itself.
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")
        if not isinstance(loaded, np.ndarray):
            loaded.close()
            return _npz_arrays(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(
            f"Cannot read {path} as numpy data. Expected a .npz or .npy file written by numpy; check the path "
            f"(--data). Received: {error}"
        ) from error
    if len(signature.inputs) != 1 or labels_key is not None:
        raise DataError(
            f"{path.name} holds one array, but signature {signature.name!r} has inputs "
            f"{sorted(signature.inputs)}{' and labels were asked for' if labels_key else ''}. Expected a .npz "
            f"with one array per input (and labels); write it with np.savez. Received: a .npy file."
        )
    return {next(iter(signature.inputs)): loaded}


_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, file name length, extra field length
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """An .npz's members: memory-mapped when stored uncompressed (``np.savez``), else read whole."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
            mapped = _mapped_member(path, raw, info) if info.compress_type == zipfile.ZIP_STORED else None
            if mapped is None:
                with archive.open(info) as member:
                    mapped = np.lib.format.read_array(member, allow_pickle=False)
            arrays[name] = mapped
    return arrays


def _mapped_member(path: Path, raw: Any, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Map a stored member's array in place: its data starts after the zip local header and the .npy header."""
    raw.seek(info.header_offset)
    signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        return None
    raw.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length)
    reader = _NPY_HEADER_READERS.get(np.lib.format.read_magic(raw))
    if reader is None:
        return None
    shape, fortran_order, dtype = reader(raw)
    if dtype.hasobject or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran_order else "C", offset=raw.tell())


def _fit(name: str, array: np.ndarray, signature: SignatureSpec, problems: list[str], cast: bool) -> np.ndarray:
    spec = signature.inputs[name]
    if spec.dtype in SUPPORTED_DTYPES and spec.dtype != "string" and array.dtype.kind in "biufc":
        target = numpy_dtype(spec.dtype)
        if array.dtype != target:
            if np.can_cast(array.dtype, target, casting="same_kind"):
                array = array.astype(target) if cast else array
            else:
                problems.append(f"{name!r} has dtype {array.dtype}, the signature wants {spec.dtype}")
    if spec.shape is not None:
        declared = spec.shape
        if array.ndim != len(declared) or any(want not in (None, got) for want, got in zip(declared, array.shape)):
            shown = ["None" if size is None else size for size in declared]
            problems.append(f"{name!r} has shape {list(array.shape)}, the signature wants {shown}")
    return array


__all__ = [
    "ArraySource",
    "Batch",
    "DataOptions",
    "DataSource",
    "Dataset",
    "IterableSource",
    "Shard",
    "TFRecordSource",
    "expand_paths",
    "load_dataset",
    "open_data",
]
