"""TensorFlow's checkpoint format (a tensor bundle) written from Python, for tensors of numbers, in small writes.

A bundle `PREFIX` is two files: `PREFIX.data-00000-of-00001`, each tensor's bytes one after another, and
`PREFIX.index`, a sorted table (LevelDB's format) from each key to a `BundleEntryProto` (dtype, shape, offset, size,
masked CRC-32C of the bytes), plus a `BundleHeaderProto` under the empty key. `write_bundle` writes both files byte
for byte as TensorFlow's `SaveV2` op writes them for the same tensors in the same order (`BundleWriter::Add` and
`BundleWriter::Finish` in tensorflow/core/util/tensor_bundle/tensor_bundle.cc; the table as
tsl/lib/io/table_builder.cc and block_builder.cc build it); `tests/unit/test_bundle.py` compares the files.

What differs is how the bytes reach the file. `SaveV2` hands the kernel whole 8 MiB buffers (`FileOutputBuffer` of
8 << 20 bytes in `BundleWriter`'s constructor), and a kernel whose page cache takes large folios (ext4 on Linux 6.x)
then takes 2 MiB blocks of memory for them; on a VM that hands fresh memory over in such blocks, writing is that slow
(README, "Benchmarks": 2.5 s per GiB, against 0.25 s in 256 KiB writes). Here a tensor is written straight from its
buffer, in `CHUNK_BYTES` writes, the size `cp` uses, with its checksum computed on the way.

Strings, variants and slices of partitioned variables are not written here: TensorFlow's own op writes those.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from ema_export.errors import naming_the_file

CHUNK_BYTES = 256 * 1024
"""Bytes per write() call: small enough that the page cache takes small folios, large enough that calls are few."""

BLOCK_BYTES = 262144
"""A table block is closed once it holds this many bytes (`table::Options::block_size`, tsl/lib/io/table_options.h)."""

RESTART_INTERVAL = 16
"""Keys between restart points in a data block (`table::Options::block_restart_interval`); the index block uses 1."""

TABLE_MAGIC = 0xDB4775248B80FB57
"""The last 8 bytes of every table (`kTableMagicNumber`, tsl/lib/io/format.h)."""

_BLOCK_HANDLE_MAX_BYTES = 20  # two varint64s: BlockHandle::kMaxEncodedLength
_TENSOR_BUNDLE_VERSION = 1  # kTensorBundleVersion; kTensorBundleMinConsumer is 0
_CRC_MASK_DELTA = 0xA282EAD8


def data_filename(prefix: str) -> str:
    """The data file of a one-shard bundle (`DataFilename(prefix, 0, 1)`)."""
    return f"{prefix}.data-00000-of-00001"


def index_filename(prefix: str) -> str:
    """The index of a bundle (`MetaFilename(prefix)`)."""
    return f"{prefix}.index"


def writable(dtype: Any, slice_spec: str) -> bool:
    """Whether `write_bundle` writes a tensor of this `tf.DType` saved under this slice spec: whole tensors whose
    bytes are their values (TensorFlow's `DataTypeCanUseMemcpy`), on a little-endian host (the header says so)."""
    return (sys.byteorder == "little" and not slice_spec and dtype.is_numpy_compatible
            and np.dtype(dtype.as_numpy_dtype).kind in "biufcV")


def masked_crc32c(crc: int) -> int:
    """CRC-32C as checkpoints and tables store it (`crc32c::Mask`): rotated right 15 bits, plus a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def write_bundle(prefix: str, tensors: Sequence[tuple[str, Any]]) -> None:
    """Write `tensors` (pairs of checkpoint key and eager CPU tensor, each `writable`) as the bundle `prefix`, in
    this order in the data file; the index is written last, so a bundle with an index is whole.

    Raises:
        OSError: A write failed; it names the file (Python's write errors do not).
    """
    from tensorflow.core.framework import versions_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    entries: dict[bytes, bytes] = {}
    offset = 0
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with naming_the_file(data_filename(prefix)), open(data_filename(prefix), "wb", buffering=0) as data:
        for key, tensor in tensors:
            raw = _bytes_of(tensor)
            crc = 0
            for start in range(0, raw.size, CHUNK_BYTES):
                chunk = raw[start:start + CHUNK_BYTES]
                crc = google_crc32c.extend(crc, chunk)
                _write_all(data, chunk)
            entry = tensor_bundle_pb2.BundleEntryProto(dtype=tensor.dtype.as_datatype_enum, offset=offset,
                                                       size=raw.size, crc32c=masked_crc32c(crc))
            entry.shape.SetInParent()  # a scalar's shape is present, and empty, as TensorShape::AsProto leaves it
            for size in tensor.shape:
                entry.shape.dim.add(size=size)
            if key.encode() in entries:
                raise ValueError(f"the key {key} is given twice")
            entries[key.encode()] = entry.SerializeToString()
            offset += raw.size
    header = tensor_bundle_pb2.BundleHeaderProto(
        num_shards=1, endianness=tensor_bundle_pb2.BundleHeaderProto.LITTLE,
        version=versions_pb2.VersionDef(producer=_TENSOR_BUNDLE_VERSION))
    with naming_the_file(index_filename(prefix)), open(index_filename(prefix), "wb") as index:
        index.write(table([(b"", header.SerializeToString()), *sorted(entries.items())]))


def _bytes_of(tensor: Any) -> np.ndarray:
    """The bytes of an eager CPU tensor, as a read-only uint8 view of its own buffer (no copy)."""
    array = np.asarray(tensor)  # EagerTensor.__array__ shares the tensor's buffer; .numpy() would copy it
    raw = array.reshape(-1).view(np.uint8)
    raw.flags.writeable = False  # google_crc32c takes read-only buffers only
    return raw


def _write_all(file: Any, chunk: np.ndarray) -> None:
    view = chunk.data
    while view:
        view = view[file.write(view):]


# --- The index: a table in LevelDB's format (tsl/lib/io/table_builder.cc, block_builder.cc, format.cc) ----------

def table(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The bytes of a table holding `entries` (keys sorted, none twice), as TensorFlow's `TableBuilder` writes it
    with `kNoCompression`: data blocks of about `BLOCK_BYTES`, an empty metaindex block, an index block naming each
    data block by a short key between it and the next, and the footer."""
    out = bytearray()
    data, index = _Block(RESTART_INTERVAL), _Block(1)
    pending: bytes | None = None  # the handle of the last data block written, until the next key is known
    last_key = b""
    for key, value in entries:
        if pending is not None:
            index.add(_separator(last_key, key), pending)
            pending = None
        last_key = key
        data.add(key, value)
        if data.size_estimate() >= BLOCK_BYTES:
            pending, data = _write_block(out, data.finish()), _Block(RESTART_INTERVAL)
    if data.entries:
        pending = _write_block(out, data.finish())
    metaindex = _write_block(out, _Block(RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(_successor(last_key), pending)
    footer = metaindex + _write_block(out, index.finish())
    out += footer.ljust(2 * _BLOCK_HANDLE_MAX_BYTES, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


class _Block:
    """`BlockBuilder`: entries whose keys share a prefix with the previous one, with restart points."""

    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.entries = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        self.last_key = key
        self.counter += 1
        self.entries += 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buffer) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))


def _write_block(out: bytearray, contents: bytes) -> bytes:
    """Append a block and its trailer (compression type 0, masked CRC-32C of both); return its encoded handle."""
    handle = _varint(len(out)) + _varint(len(contents))
    out += contents + b"\0" + struct.pack("<I", masked_crc32c(google_crc32c.value(contents + b"\0")))
    return handle


def _separator(start: bytes, limit: bytes) -> bytes:
    """`BytewiseComparator::FindShortestSeparator`: a short key >= start and < limit."""
    common = 0
    while common < min(len(start), len(limit)) and start[common] == limit[common]:
        common += 1
    if common < min(len(start), len(limit)) and start[common] < 0xFF and start[common] + 1 < limit[common]:
        return start[:common] + bytes([start[common] + 1])
    return start


def _successor(key: bytes) -> bytes:
    """`BytewiseComparator::FindShortSuccessor`: a short key >= key."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
