"""The checkpoint writer of our own (`ema_export.bundle`): the same bytes as TensorFlow's `SaveV2`, in small writes.

Each test writes the same tensors with `tf.raw_ops.SaveV2` and with `write_bundle`, in the same order, and compares
both files byte for byte; TensorFlow's reader then reads ours, checksums included.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ema_export import bundle
from tests.test_export_io_errors import tmpfs

RNG = np.random.default_rng(13)


def _both(tmp_path: Path, tensors: list[tuple[str, tf.Tensor]]) -> tuple[str, str]:
    theirs, ours = str(tmp_path / "theirs" / "ckpt"), str(tmp_path / "ours" / "ckpt")
    tf.raw_ops.SaveV2(prefix=theirs, tensor_names=[key for key, _ in tensors],
                      shape_and_slices=[""] * len(tensors), tensors=[tensor for _, tensor in tensors])
    bundle.write_bundle(ours, tensors)
    return theirs, ours


def _assert_same_files_and_values(tmp_path: Path, tensors: list[tuple[str, tf.Tensor]]) -> None:
    theirs, ours = _both(tmp_path, tensors)
    for name in (bundle.index_filename, bundle.data_filename):
        assert Path(name(ours)).read_bytes() == Path(name(theirs)).read_bytes(), name(ours)
    reader = tf.train.load_checkpoint(ours)
    for key, tensor in tensors:
        assert reader.get_variable_to_dtype_map()[key] == tensor.dtype
        np.testing.assert_array_equal(reader.get_tensor(key), tensor.numpy(), err_msg=key)


def test_every_dtype_and_shape_of_numbers_is_written_as_save_v2_writes_it(tmp_path):
    tensors = [
        ("dense/kernel/.ATTRIBUTES/VARIABLE_VALUE", tf.constant(RNG.normal(size=(5, 3)), tf.float32)),
        ("dense/bias/.ATTRIBUTES/VARIABLE_VALUE", tf.constant(RNG.normal(size=3), tf.float64)),
        ("a_scalar", tf.constant(3.5)),
        ("half", tf.constant([1.5, -2.0], tf.float16)),
        ("brain_float", tf.constant([[1.0, 2.0]], tf.bfloat16)),
        ("flags", tf.constant([True, False, True])),
        ("step", tf.constant(7, tf.int64)),
        ("bytes", tf.constant([1, 255], tf.uint8)),
        ("complex", tf.constant([1 + 2j], tf.complex64)),
        ("empty", tf.zeros([0, 4])),
    ]
    _assert_same_files_and_values(tmp_path, tensors)


def test_a_tensor_larger_than_a_write_and_the_keys_out_of_order(tmp_path):
    """Several chunks per tensor (the checksum runs over all of them), and the data file in the order given while
    the index is sorted."""
    tensors = [("z/large", tf.constant(RNG.normal(size=(1000, 700)), tf.float32)),  # 2.7 chunks of 256 KiB
               ("a/odd_size", tf.constant(RNG.normal(size=(333, 1001)), tf.float64))]
    _assert_same_files_and_values(tmp_path, tensors)


def test_an_index_of_several_blocks_with_restart_points(tmp_path):
    """1500 keys of up to 400 bytes: an index over 256 KiB, so several data blocks, index keys shortened between
    blocks, and prefix-shared keys with a restart point every 16."""
    tensors = [(f"layer_{i:05d}/{'w' * (i % 389)}", tf.constant([float(i)])) for i in range(1500)]
    _assert_same_files_and_values(tmp_path, tensors)
    assert Path(bundle.index_filename(str(tmp_path / "ours" / "ckpt"))).stat().st_size > bundle.BLOCK_BYTES


def test_the_data_is_written_in_small_calls(tmp_path):
    """A 4 MiB tensor in `CHUNK_BYTES` writes (counted by the kernel, /proc/self/io), not in one call as `SaveV2`'s
    8 MiB buffer writes it."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("/proc/self/io (Linux's per-process I/O counters) is not available here")

    def write_calls() -> int:
        return int(next(line.split()[1] for line in io.read_text().splitlines() if line.startswith("syscw:")))

    tensor = tf.constant(np.ones(2**20, np.float32))  # 4 MiB
    before = write_calls()
    bundle.write_bundle(str(tmp_path / "ckpt"), [("ones", tensor)])
    chunks = 4 * 2**20 // bundle.CHUNK_BYTES
    assert chunks <= write_calls() - before <= chunks + 8  # the data in chunks, then the index


def test_a_key_given_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the key twice is given twice"):
        bundle.write_bundle(str(tmp_path / "ckpt"), [("twice", tf.constant(1.0)), ("twice", tf.constant(2.0))])


def test_only_whole_tensors_of_numbers_are_written_here():
    assert bundle.writable(tf.float32, "") and bundle.writable(tf.bfloat16, "") and bundle.writable(tf.bool, "")
    assert not bundle.writable(tf.string, "")  # the object graph: TensorFlow's SaveV2 writes it
    assert not bundle.writable(tf.variant, "") and not bundle.writable(tf.resource, "")
    assert not bundle.writable(tf.float32, "4 8 0,2:-")  # a slice of a partitioned variable


def test_a_full_disk_names_the_file_being_written(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as disk:
        with pytest.raises(OSError) as raised:
            bundle.write_bundle(str(disk / "ckpt"), [("large", tf.zeros([2**16]))])  # 256 KiB
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == bundle.data_filename(str(disk / "ckpt"))
