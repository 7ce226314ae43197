"""TFRecord files of ``tf.Example``, read without the TensorFlow runtime.

Why our own reader: ``tf.data.TFRecordDataset`` needs all of TensorFlow in the client process (seconds to import,
hundreds of MB), which is what this client exists to avoid. The format is small: each record is

    uint64 length | uint32 masked CRC32C of the length | data[length] | uint32 masked CRC32C of the data

(little-endian; the mask is TensorFlow's ``((crc >> 15) | (crc << 17)) + 0xa282ead8``, see
``tensorflow/core/lib/hash/crc32c.h`` and ``tensorflow/tsl/lib/io/record_reader.cc``), optionally inside one GZIP
stream. Both checksums are verified. The CRC32C itself comes from ``google-crc32c`` (hardware-accelerated, with a
pure-Python fallback). ``tf.Example`` is parsed with the generated protocol module (``serving.protocol.example_pb2``).

A corrupt record is an error naming the file and the byte offset (in the decompressed stream for GZIP files). With
``skip_corrupt`` it is counted and skipped instead: a record whose data checksum fails is skipped and reading goes
on, because its length was verified; a bad length checksum or a truncated record ends that file (nothing after it
can be framed reliably), as TensorFlow's reader does.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import google_crc32c
import numpy as np

from serving.client import SignatureSpec, TensorSpec
from serving.codec import numpy_dtype
from serving.protocol import DataError, example_pb2

Compression = Literal["auto", "none", "gzip"]

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
_READ_BUFFER = 1 << 20


class CorruptRecordError(DataError):
    """A TFRecord file whose framing or checksums are wrong (names the file and the offset)."""


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """One record's bytes and where it starts (file, byte offset), for error messages."""

    path: str
    offset: int
    data: bytes


@dataclass
class CorruptionLog:
    """Corrupt records met while reading with ``skip_corrupt``: how many, and the first few, described."""

    num_corrupt: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """Count one corrupt record (keeping the first five descriptions)."""
        self.num_corrupt += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def read_records(
    path: str | Path,
    *,
    compression: Compression = "auto",
    skip_corrupt: bool = False,
    log: CorruptionLog | None = None,
) -> Iterator[Record]:
    """Yield the records of one TFRecord file, checking both checksums of each.

    Args:
        path: the file.
        compression: ``"auto"`` (GZIP when the file starts with GZIP's magic bytes), ``"none"`` or ``"gzip"``.
        skip_corrupt: count and skip corrupt records (in ``log``) instead of raising.
        log: where skipped records are counted.

    Raises:
        CorruptRecordError: a record's framing or checksum is wrong (and ``skip_corrupt`` is off).
        DataError: the file cannot be opened.
    """
    log = log if log is not None else CorruptionLog()
    with _open(Path(path), compression) as stream:
        offset = 0
        while True:
            try:
                data, problem, resumable = _next_record(stream)
            except (OSError, EOFError, zlib.error) as error:  # a damaged GZIP stream
                data, problem, resumable = None, f"unreadable compressed data ({error})", False
            if data is None and problem is None:
                return
            if problem is None:
                yield Record(str(path), offset, data)  # type: ignore[arg-type]
            else:
                _corrupt(f"{path} at byte {offset}", problem, skip_corrupt, log)
                if not resumable:
                    return
            offset += _HEADER.size + len(data) + _FOOTER.size  # type: ignore[arg-type]


def _corrupt(where: str, problem: str, skip_corrupt: bool, log: CorruptionLog) -> None:
    if not skip_corrupt:
        raise CorruptRecordError(
            f"Corrupt TFRecord record in {where}: {problem}. Expected records framed as TensorFlow writes them, with "
            "valid CRC32C checksums; re-create the file, or skip such records with --skip-corrupt "
            f"(skip_corrupt=True). Received: {problem}."
        )
    log.note(f"{where}: {problem}")


def _next_record(stream: BinaryIO) -> tuple[bytes | None, str | None, bool]:
    """``(data, problem, resumable)``: data None at a clean end; problem set when the record is corrupt."""
    header = stream.read(_HEADER.size)
    if not header:
        return None, None, False
    if len(header) < _HEADER.size:
        return None, f"truncated record header ({len(header)} of {_HEADER.size} bytes)", False
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        return None, "the length's checksum does not match", False
    payload = stream.read(length + _FOOTER.size)
    if len(payload) < length + _FOOTER.size:
        return None, f"truncated record (header says {length} bytes, {max(0, len(payload) - 4)} follow)", False
    data = payload[:length]
    (data_crc,) = _FOOTER.unpack(payload[length:])
    if masked_crc32c(data) != data_crc:
        return data, "the data's checksum does not match", True
    return data, None, True


def _open(path: Path, compression: Compression) -> BinaryIO:
    try:
        raw = open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 - handed to the caller's with-block
    except OSError as error:
        raise DataError(
            f"Cannot open TFRecord file {path}. Expected a readable file; check the path (--data). Received: {error}."
        ) from error
    if compression == "gzip" or (compression == "auto" and raw.peek(2)[:2] == _GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression not in ("auto", "none", "gzip"):
        raw.close()
        raise DataError(
            f"Unknown TFRecord compression {compression!r}. Expected one of auto, none, gzip; fix --compression. "
            f"Received: {compression!r}."
        )
    return raw


# ------------------------------------------------------------------------------------------------------- tf.Example
@dataclass(frozen=True)
class ExampleDecoder:
    """Turns serialized ``tf.Example`` records into one row per signature input (and the label), numpy arrays.

    A feature named like an input fills it: ``float_list`` for floating inputs, ``int64_list`` for integer and bool
    inputs, ``bytes_list`` for string inputs, or a single ``bytes_list`` value holding the raw little-endian row of a
    numeric input (how images are often stored). Values are reshaped to the input's shape without its batch
    dimension (one unknown dimension is inferred). The label feature is one value per example (a class id or a
    target) or a list shaped like the output row.
    """

    signature: SignatureSpec
    labels_key: str | None = None

    def decode(self, record: Record) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The record's input rows and label.

        Raises:
            DataError: the record is not a tf.Example, or a feature is missing or does not fit its input.
        """
        try:
            example = example_pb2.Example.FromString(record.data)
        except Exception as error:  # protobuf's DecodeError has no common public base across backends
            raise DataError(
                f"{record.path} at byte {record.offset}: the record is not a serialized tf.Example. Expected "
                f"tf.train.Example records; check the file (--data). Received: {error}."
            ) from error
        features = example.features.feature
        rows = {name: self._row(record, features, spec) for name, spec in self.signature.inputs.items()}
        label = None
        if self.labels_key is not None:
            label = _values(record, features, self.labels_key, "the labels (--labels)")
            label = label[0] if label.size == 1 else label
        return rows, label

    def _row(self, record: Record, features: Mapping[str, Any], spec: TensorSpec) -> np.ndarray:
        values = _values(record, features, spec.name, f"input {spec.name!r} of signature {self.signature.name!r}")
        shape = _row_shape(spec)
        target = np.dtype(object) if spec.dtype == "string" else numpy_dtype(spec.dtype)
        if values.dtype == object and target != object and values.size == 1:
            values = _raw_row(record, spec, values[0], target, shape)
        elif not _compatible(values.dtype, target):
            raise DataError(
                f"{record.path} at byte {record.offset}: feature {spec.name!r} is a {_kind(values.dtype)} list, but "
                f"input {spec.name!r} is {spec.dtype}. Expected a {_kind(target)} list (or raw bytes of one row); "
                f"write the feature with that type. Received: {values.size} {_kind(values.dtype)} values."
            )
        return _reshape(record, spec, values.astype(target, copy=False), shape)


def _values(record: Record, features: Mapping[str, Any], name: str, role: str) -> np.ndarray:
    if name not in features:
        raise DataError(
            f"{record.path} at byte {record.offset}: the tf.Example has no feature {name!r} for {role}. Expected a "
            f"feature named like each input (and the labels); rename the features or fix --labels. "
            f"Received features: {sorted(features)}."
        )
    feature = features[name]
    kind = feature.WhichOneof("kind")
    if kind == "float_list":
        return np.asarray(feature.float_list.value, dtype=np.float32)
    if kind == "int64_list":
        return np.asarray(feature.int64_list.value, dtype=np.int64)
    if kind == "bytes_list":
        return np.asarray(list(feature.bytes_list.value), dtype=object)
    return np.zeros(0, dtype=np.float32)


def _row_shape(spec: TensorSpec) -> tuple[int | None, ...] | None:
    if spec.shape is None:
        return None
    return spec.shape[1:]


def _reshape(record: Record, spec: TensorSpec, values: np.ndarray, shape: tuple[int | None, ...] | None) -> np.ndarray:
    if shape is None:
        return values
    unknown = [index for index, size in enumerate(shape) if size is None]
    known = int(np.prod([size for size in shape if size is not None], dtype=np.int64))
    fits = values.size == known if not unknown else (len(unknown) == 1 and known and values.size % known == 0)
    if not fits:
        shown = ["None" if size is None else size for size in shape]
        raise DataError(
            f"{record.path} at byte {record.offset}: feature {spec.name!r} has {values.size} values, which do not "
            f"fill one example of input {spec.name!r}, shape {shown} (the signature's shape without the batch "
            f"dimension{'; at most one unknown dimension can be inferred' if len(unknown) > 1 else ''}). Expected "
            f"{known if not unknown else f'a multiple of {known}'} values; fix the feature. "
            f"Received: {values.size} values."
        )
    return values.reshape([-1 if size is None else size for size in shape])


def _raw_row(
    record: Record, spec: TensorSpec, raw: bytes, target: np.dtype, shape: tuple[int | None, ...] | None
) -> np.ndarray:
    if len(raw) % target.itemsize:
        raise DataError(
            f"{record.path} at byte {record.offset}: feature {spec.name!r} holds {len(raw)} bytes, not a whole number "
            f"of {spec.dtype} values. Expected the raw little-endian bytes of one row of input {spec.name!r}; fix the "
            f"feature. Received: {len(raw)} bytes."
        )
    return np.frombuffer(raw, dtype=target.newbyteorder("<"))


def _compatible(source: np.dtype, target: np.dtype) -> bool:
    if target == object:
        return source == object
    if source.kind == "f":
        return target.kind == "f" or target.name == "bfloat16"
    if source.kind == "i":
        return target.kind in "iub"
    return False


def _kind(dtype: np.dtype) -> str:
    return {"f": "float", "i": "int64", "u": "int64", "b": "int64"}.get(dtype.kind, "bytes")


__all__ = [
    "CorruptRecordError",
    "CorruptionLog",
    "ExampleDecoder",
    "Record",
    "masked_crc32c",
    "read_records",
]

