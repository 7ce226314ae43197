"""TFRecord reading without TensorFlow, checked against files TensorFlow itself writes (tf.io.TFRecordWriter)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from serving.client import SignatureSpec, TensorSpec
from serving.data import Shard, TFRecordSource
from serving.protocol import DataError
from serving.tfrecord import CorruptionLog, CorruptRecordError, ExampleDecoder, Record, masked_crc32c, read_records


def write(path, payloads, compression: str = "") -> None:
    with tf.io.TFRecordWriter(str(path), options=compression or None) as writer:
        for payload in payloads:
            writer.write(payload)


def example(**features) -> bytes:
    def feature(value):
        value = np.asarray(value)
        if value.dtype.kind == "f":
            return tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel()))
        if value.dtype.kind in "iu":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=value.ravel()))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(value.ravel())))

    return tf.train.Example(
        features=tf.train.Features(feature={name: feature(value) for name, value in features.items()})
    ).SerializeToString()


def signature(**inputs: tuple[str, tuple]) -> SignatureSpec:
    specs = {name: TensorSpec(name, dtype, shape, f"{name}:0") for name, (dtype, shape) in inputs.items()}
    return SignatureSpec("serve_ema", "tensorflow/serving/predict", specs, {})


PAYLOADS = [b"", b"a", bytes(range(256)) * 40, b"last record"]


@pytest.mark.parametrize("compression", ["", "GZIP"])
def test_records_written_by_tensorflow_read_back_with_their_offsets(tmp_path, compression) -> None:
    path = tmp_path / "data.tfrecord"
    write(path, PAYLOADS, compression)
    records = list(read_records(path))  # auto-detects GZIP
    assert [record.data for record in records] == PAYLOADS
    assert [record.offset for record in records] == [0, 16, 33, 10289]  # 12-byte header + data + 4-byte footer each


def test_masked_crc32c_is_tensorflows(tmp_path) -> None:
    write(tmp_path / "one.tfrecord", [b"hello"])
    raw = (tmp_path / "one.tfrecord").read_bytes()
    assert int.from_bytes(raw[8:12], "little") == masked_crc32c(raw[:8])
    assert int.from_bytes(raw[-4:], "little") == masked_crc32c(b"hello")


def test_a_corrupt_record_names_the_file_and_offset_or_is_skipped_and_counted(tmp_path) -> None:
    path = tmp_path / "bad.tfrecord"
    write(path, [b"first", b"second", b"third"])
    raw = bytearray(path.read_bytes())
    raw[21 + 12 + 2] ^= 0xFF  # a byte inside "second"'s data (the first record is 12 + 5 + 4 = 21 bytes)
    path.write_bytes(bytes(raw))
    expected = rf"{path} at byte 21: the data's checksum does not match.*--skip-corrupt"
    with pytest.raises(CorruptRecordError, match=expected):
        list(read_records(path))
    log = CorruptionLog()
    assert [record.data for record in read_records(path, skip_corrupt=True, log=log)] == [b"first", b"third"]
    assert log.num_corrupt == 1 and "at byte 21" in log.examples[0]


def test_a_truncated_file_or_a_bad_length_ends_the_file(tmp_path) -> None:
    path = tmp_path / "cut.tfrecord"
    write(path, [b"first", b"second"])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptRecordError, match="truncated record"):
        list(read_records(path))
    log = CorruptionLog()
    assert [record.data for record in read_records(path, skip_corrupt=True, log=log)] == [b"first"]
    raw = bytearray((tmp_path / "cut.tfrecord").read_bytes())
    raw[0] ^= 1  # the first length no longer matches its checksum: nothing after it can be framed
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError, match="at byte 0: the length's checksum"):
        list(read_records(path))


def test_a_damaged_gzip_stream_is_a_corrupt_record(tmp_path) -> None:
    path = tmp_path / "bad.tfrecord.gz"
    write(path, [b"x" * 1000] * 5, "GZIP")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError, match="bad.tfrecord.gz"):
        list(read_records(path))


def test_examples_fill_the_signature_inputs_reshaped() -> None:
    spec = signature(image=("float32", (None, 2, 3)), ids=("int32", (None, 2)), text=("string", (None,)),
                     pixels=("uint8", (None, 2, 2)), flags=("bool", (None, None)))  # fmt: skip
    decoder = ExampleDecoder(spec, labels_key="label")
    payload = example(image=np.arange(6, dtype=np.float32), ids=np.array([7, 8]), text=np.array([b"hi"]),
                      pixels=np.array([bytes([1, 2, 3, 4])]), flags=np.array([1, 0, 1]),
                      label=np.array([2]))  # fmt: skip
    rows, label = decoder.decode(Record("f", 0, payload))
    np.testing.assert_array_equal(rows["image"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert rows["image"].dtype == np.float32 and rows["ids"].dtype == np.int32 and rows["ids"].tolist() == [7, 8]
    assert rows["text"].tolist() == b"hi" and rows["pixels"].tolist() == [[1, 2], [3, 4]]
    assert rows["flags"].tolist() == [True, False, True] and label == 2


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"image": np.arange(5, dtype=np.float32)}, "feature 'image' has 5 values, .* shape \\[2, 3\\].*Expected 6"),
        ({"picture": np.arange(6, dtype=np.float32)}, "no feature 'image' .*Received features: \\['picture'\\]"),
        ({"image": np.arange(6)}, "feature 'image' is a int64 list, but input 'image' is float32"),
    ],
)
def test_a_feature_that_does_not_fit_is_named_with_the_expected_shape(features, expected) -> None:
    decoder = ExampleDecoder(signature(image=("float32", (None, 2, 3))))
    with pytest.raises(DataError, match=expected):
        decoder.decode(Record("val.tfrecord", 99, example(**features)))
    with pytest.raises(DataError, match="not a serialized tf.Example"):
        decoder.decode(Record("val.tfrecord", 99, b"\xff\xff\xff"))


def test_shards_split_the_records_of_several_files_exactly(tmp_path) -> None:
    payloads = [example(x=np.array([float(number)], np.float32), label=np.array([number])) for number in range(23)]
    write(tmp_path / "a.tfrecord", payloads[:10])
    write(tmp_path / "b.tfrecord.gz", payloads[10:], "GZIP")
    paths = (str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord.gz"))
    decoder = ExampleDecoder(signature(x=("float32", (None, 1))), labels_key="label")
    seen = []
    for index in range(3):
        source = TFRecordSource(paths, decoder, shard=Shard(index, 3))
        for batch in source.batches(4):
            assert batch.num_rows <= 4 and batch.inputs["x"].shape == (batch.num_rows, 1)
            assert (batch.rows % 3 == index).all() and batch.labels.tolist() == batch.rows.tolist()
            np.testing.assert_array_equal(batch.inputs["x"][:, 0], batch.rows.astype(np.float32))
            seen += batch.rows.tolist()
    assert sorted(seen) == list(range(23))
