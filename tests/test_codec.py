"""The TensorFlow-free codec against TensorFlow's own `tf.make_tensor_proto` / `tf.make_ndarray` as the reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving import codec
from serving.protocol import CodecError, TensorProto

NUMERIC_DTYPES = [
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool", "complex64", "complex128",
]  # fmt: skip
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
PROPERTY = settings(max_examples=30, deadline=None)


def assert_same_array(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    elif expected.dtype.kind in "fcV" or expected.dtype == ml_dtypes.bfloat16:
        # Compare as complex128 (exact for every float width) so NaN == NaN works for bfloat16 too; and signed zeros.
        wide_actual, wide_expected = actual.astype(np.complex128), expected.astype(np.complex128)
        np.testing.assert_array_equal(wide_actual, wide_expected)
        assert np.array_equal(np.signbit(wide_actual.real), np.signbit(wide_expected.real))
    else:
        np.testing.assert_array_equal(actual, expected)


def arrays_of(dtype: str) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.dtype(dtype), SHAPES)


def bfloat16_arrays() -> st.SearchStrategy[np.ndarray]:
    # numpy cannot generate bfloat16 itself: draw float32 and round, as a model's bfloat16 output would be.
    return arrays_of("float32").map(lambda array: array.astype(ml_dtypes.bfloat16))


def string_arrays() -> st.SearchStrategy[np.ndarray]:
    def to_object(items: list[bytes]) -> np.ndarray:
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array

    return st.lists(st.binary(max_size=12), max_size=8).map(to_object)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@PROPERTY
@given(data=st.data())
def test_every_numeric_dtype_round_trips_against_tensorflow(dtype: str, data: st.DataObject) -> None:
    array = data.draw(arrays_of(dtype))
    for form in ("content", "values"):
        ours = codec.encode(array, form=form)
        assert_same_array(tf.make_ndarray(ours), array)
        assert_same_array(codec.decode(ours), array)
    assert_same_array(codec.decode(tf.make_tensor_proto(array)), array)


@PROPERTY
@given(array=bfloat16_arrays())
def test_bfloat16_round_trips_against_tensorflow(array: np.ndarray) -> None:
    for form in ("content", "values"):
        ours = codec.encode(array, form=form)
        assert_same_array(tf.make_ndarray(ours), array)
        assert_same_array(codec.decode(ours), array)
    assert_same_array(codec.decode(tf.make_tensor_proto(array)), array)


@PROPERTY
@given(array=string_arrays())
def test_strings_round_trip_as_bytes_against_tensorflow(array: np.ndarray) -> None:
    ours = codec.encode(array)
    assert list(ours.string_val) == array.tolist()
    assert_same_array(tf.make_ndarray(ours), array)
    assert_same_array(codec.decode(tf.make_tensor_proto(array)), array)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64"])
@PROPERTY
@given(data=st.data())
def test_content_form_is_byte_identical_to_tensorflow(dtype: str, data: st.DataObject) -> None:
    # For the dtypes TensorFlow itself writes as tensor_content (with more than one element), the encodings agree.
    array = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5)))
    assert codec.encode(array).SerializeToString() == tf.make_tensor_proto(array).SerializeToString()


@pytest.mark.parametrize(
    ("dtype", "field"),
    [("float32", "float_val"), ("float64", "double_val"), ("int32", "int_val"), ("int64", "int64_val"),
     ("uint32", "uint32_val"), ("uint64", "uint64_val"), ("bool", "bool_val"), ("float16", "half_val")],
)  # fmt: skip
@PROPERTY
@given(data=st.data())
def test_one_value_broadcasts_to_the_shape_both_ways(dtype: str, field: str, data: st.DataObject) -> None:
    value = data.draw(hnp.from_dtype(np.dtype(dtype), allow_nan=False))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    assume(np.prod(shape) > 1)  # a one-element tensor is not a broadcast
    expected = np.full(shape, value, dtype=dtype)
    ours = codec.encode(np.asarray(value, dtype=dtype), shape=shape)
    assert len(getattr(ours, field)) == 1 and not ours.tensor_content
    assert_same_array(tf.make_ndarray(ours), expected)
    assert_same_array(codec.decode(ours), expected)
    assert_same_array(codec.decode(tf.make_tensor_proto(value, dtype=dtype, shape=shape)), expected)


def test_half_val_holds_float16_bit_patterns() -> None:
    array = np.array([1.0, -2.5, np.inf, 65504.0], dtype=np.float16)
    proto = codec.encode(array, form="values")
    assert list(proto.half_val) == array.view(np.uint16).tolist()
    reference = tf.make_tensor_proto(array)
    reference.ClearField("tensor_content")
    reference.half_val.extend(array.view(np.uint16).tolist())
    assert_same_array(codec.decode(reference), array)


def test_int64_val_keeps_values_beyond_float_precision() -> None:
    array = np.array([2**62 + 1, -(2**63), 2**63 - 1], dtype=np.int64)
    proto = codec.encode(array, form="values")
    assert list(proto.int64_val) == array.tolist()
    assert_same_array(codec.decode(proto), array)


@pytest.mark.parametrize("num_values", [0, 1, 2, 5])
def test_short_value_lists_follow_tensorflows_rule(num_values: int) -> None:
    # Fewer values than elements: the last value repeats; none at all: zeros. Same as tf.make_ndarray.
    proto = TensorProto(dtype=tf.float32.as_datatype_enum)
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=3)
    proto.float_val.extend([float(index) + 0.5 for index in range(num_values)])
    assert_same_array(codec.decode(proto), tf.make_ndarray(proto))


def test_strings_from_lists_keep_trailing_nul_bytes() -> None:
    assert list(codec.encode([b"a\x00", "é"]).string_val) == [b"a\x00", "é".encode()]


def test_decoded_content_is_a_read_only_view_unless_asked() -> None:
    proto = codec.encode(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = codec.decode(proto)
    assert not view.flags.writeable
    copy = codec.decode(proto, writable=True)
    copy[0, 0] = 9.0
    assert copy.flags.writeable and view[0, 0] == 0.0


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.arange(4, dtype=">i4")
    assert_same_array(tf.make_ndarray(codec.encode(array)), np.arange(4, dtype=np.int32))


def test_encoding_fills_an_existing_message_in_place() -> None:
    request_input = TensorProto(dtype=tf.string.as_datatype_enum, string_val=[b"stale"])
    codec.encode(np.ones(3, np.int32), out=request_input)
    assert not request_input.string_val
    assert_same_array(codec.decode(request_input), np.ones(3, np.int32))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: codec.encode(np.array(["2024-01-01"], dtype="datetime64[D]")), "Cannot encode numpy dtype"),
        (lambda: codec.encode([[1, 2], [3]]), "dense numpy array"),
        (lambda: codec.encode(np.ones(4), shape=(3,)), "Expected exactly 3 values"),
        (lambda: codec.encode(np.ones(2), form="json"), "Unknown form"),  # type: ignore[arg-type]
        (lambda: codec.decode(TensorProto(dtype=tf.resource.as_datatype_enum)), "DT_RESOURCE"),
        (lambda: codec.decode(_proto_with(tensor_content=b"\x00" * 7)), "Expected 8 bytes"),
        (lambda: codec.decode(_proto_with(dims=[-1])), "not fully known"),
        (lambda: codec.decode(_proto_with(float_val=[1.0, 2.0, 3.0])), "Expected at most 2"),
    ],
)
def test_bad_tensors_raise_codec_errors_that_say_what_was_received(make, message: str) -> None:
    with pytest.raises(CodecError, match=message) as raised:
        make()
    assert "Received:" in str(raised.value)
    assert isinstance(raised.value, ValueError)


def _proto_with(*, dims: list[int] = [2], **fields) -> TensorProto:  # noqa: B006 - read-only default
    proto = TensorProto(dtype=tf.float32.as_datatype_enum, **fields)
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_dtype_names_map_both_ways() -> None:
    for name in codec.SUPPORTED_DTYPES:
        assert codec.dtype_name(codec.datatype_of(name)) == name
    assert codec.datatype_of(np.float32) == tf.float32.as_datatype_enum
    assert codec.datatype_of(np.dtype("U3")) == tf.string.as_datatype_enum
    assert codec.dtype_name(tf.variant.as_datatype_enum) == "DT_VARIANT"


# ------------------------------------------------------------------------------------- wire format, without messages
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@PROPERTY
@given(data=st.data())
def test_decoding_serialized_bytes_matches_tensorflow_for_both_forms(dtype: str, data: st.DataObject) -> None:
    array = data.draw(arrays_of(dtype))
    for proto in (codec.encode(array, form="values"), codec.encode(array), tf.make_tensor_proto(array)):
        wire = proto.SerializeToString()
        assert_same_array(codec.decode_bytes(wire), tf.make_ndarray(TensorProto.FromString(wire)))
    assert codec.encode_bytes(array) == codec.encode(array).SerializeToString()


@PROPERTY
@given(array=bfloat16_arrays())
def test_bfloat16_bytes_round_trip(array: np.ndarray) -> None:
    for form in ("content", "values"):
        assert_same_array(codec.decode_bytes(codec.encode_bytes(array, form=form)), array)


@PROPERTY
@given(array=string_arrays())
def test_string_bytes_round_trip(array: np.ndarray) -> None:
    assert codec.encode_bytes(array) == tf.make_tensor_proto(array).SerializeToString()
    assert_same_array(codec.decode_bytes(codec.encode_bytes(array)), array)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64"])
@PROPERTY
@given(data=st.data())
def test_encoded_bytes_are_tensorflows_bytes(dtype: str, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=5)))
    assert codec.encode_bytes(array) == tf.make_tensor_proto(array).SerializeToString()


def test_varint_fields_at_their_extremes() -> None:
    cases = [
        np.array([0, -1, 2**31 - 1, -(2**31), 127, 128, 300], np.int32),
        np.array([0, -1, 2**63 - 1, -(2**63), 2**35], np.int64),
        np.array([0, 2**64 - 1, 2**63], np.uint64),
        np.array([0, 2**32 - 1], np.uint32),
        np.array([True, False, True]),
        np.array([0, 255], np.uint8),
        np.array([-(2**15), 2**15 - 1], np.int16),
        # Large enough (> 16 KB of varints) for the per-byte-position decoder, with every length from 1 to 10 bytes.
        np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 6000) >> np.random.default_rng(1).integers(0, 63, 6000),
    ]
    for array in cases:
        wire = codec.encode_bytes(array, form="values")
        assert_same_array(codec.decode_bytes(wire), array)
        assert_same_array(codec.decode_bytes(wire), tf.make_ndarray(TensorProto.FromString(wire)))


def test_unpacked_repeated_fields_are_still_read() -> None:
    # Protobuf parsers must accept repeated scalars one key per value; nothing TF Serving uses writes them so.
    header = bytes([0x08, 0x01]) + b"\x12\x04\x12\x02\x08\x03"  # dtype float, shape [3]
    unpacked = header + b"".join(b"\x2d" + np.float32(value).tobytes() for value in (1.5, -2.0, 4.0))
    assert_same_array(codec.decode_bytes(unpacked), np.array([1.5, -2.0, 4.0], np.float32))
    assert_same_array(codec.decode_bytes(unpacked), tf.make_ndarray(TensorProto.FromString(unpacked)))


def test_decoded_bytes_are_views_of_the_buffer_unless_asked() -> None:
    wire = codec.encode_bytes(np.arange(6, dtype=np.float32))
    view = codec.decode_bytes(wire)
    assert not view.flags.writeable and not view.flags.owndata
    assert codec.decode_bytes(wire, writable=True).flags.writeable
    values = codec.encode_bytes(np.arange(6, dtype=np.float32), form="values")
    assert codec.decode_bytes(values, writable=True).flags.writeable


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x08", "varint is truncated"),
        (b"\x08\x01\x22\x10abc", "runs past the end"),
        (b"\x0b", "wire type 3"),
        (bytes([0x08, 0x01, 0x12, 0x04, 0x12, 0x02, 0x08, 0x02, 0x2a, 0x03, 0, 0, 0]), "whole number of 4-byte"),
        (bytes([0x08, 0x09, 0x12, 0x04, 0x12, 0x02, 0x08, 0x02, 0x52, 0x01, 0x80]), "truncated"),
        (bytes([0x08, 0x14]), "DT_RESOURCE"),
    ],
)
def test_malformed_bytes_raise_codec_errors(wire: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.decode_bytes(wire)


# --------------------------------------------------------------------------------------------- the decoding policies
# Policy.FROM_PROTO is checked against Tensor::FromProto itself: tf.io.parse_tensor builds its output with it.
FROM_PROTO = codec.Policy.FROM_PROTO


def from_proto_reference(wire: bytes, dtype: str) -> np.ndarray | None:
    """What TensorFlow's ``Tensor::FromProto`` makes of the bytes, or None when it refuses them."""
    try:
        tensor = tf.io.parse_tensor(wire, out_type=tf.as_dtype(dtype))
    except tf.errors.InvalidArgumentError:
        return None
    return np.asarray(tensor.numpy(), dtype=object) if dtype == "string" else tensor.numpy()


def decode_both_ways(wire: bytes, policy: codec.Policy = codec.Policy.STRICT) -> np.ndarray:
    """decode_bytes on the wire and decode on the parsed message: the same array, or the same refusal."""
    try:
        from_wire = codec.decode_bytes(wire, policy=policy)
    except codec.TensorDecodeError as error:
        with pytest.raises(codec.TensorDecodeError) as refused:
            codec.decode(TensorProto.FromString(wire), policy=policy)
        assert refused.value.reason == error.reason
        raise
    assert_same_array(codec.decode(TensorProto.FromString(wire), policy=policy), from_wire)
    return from_wire


def with_shape(proto: TensorProto, shape: tuple[int, ...]) -> bytes:
    proto.tensor_shape.Clear()
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto.SerializeToString()


@pytest.mark.parametrize("dtype", [*NUMERIC_DTYPES, "string"])
@PROPERTY
@given(data=st.data())
def test_server_policy_is_tensorflows_from_proto_and_the_client_policy_is_make_ndarray(
    dtype: str, data: st.DataObject
) -> None:
    # Any number of values for any shape: short lists broadcast, long ones are cut (server) or refused (client).
    shape = data.draw(SHAPES)
    num_elements = int(np.prod(shape))
    num_values = data.draw(st.integers(0, num_elements + 3))
    if dtype == "string":
        values = np.empty(num_values, dtype=object)
        values[:] = data.draw(st.lists(st.binary(max_size=12), min_size=num_values, max_size=num_values))
        form = "values"
    else:
        values = data.draw(hnp.arrays(np.dtype(dtype), num_values))
        form = data.draw(st.sampled_from(["content", "values"]))
    wire = with_shape(codec.encode(values, form=form), shape)

    expected = from_proto_reference(wire, dtype)
    if expected is None:  # tensor_content of the wrong length
        with pytest.raises(codec.TensorDecodeError, match="tensor_content"):
            decode_both_ways(wire, FROM_PROTO)
    else:
        assert_same_array(decode_both_ways(wire, FROM_PROTO), expected)

    try:
        reference = tf.make_ndarray(TensorProto.FromString(wire))
    except ValueError:  # more values than elements, or tensor_content that does not fit
        with pytest.raises(codec.TensorDecodeError):
            decode_both_ways(wire)
    else:
        if dtype == "string" and num_values == 0:
            reference = np.full(shape, b"", dtype=object)  # make_ndarray fills with str ''; FromProto with bytes
        assert_same_array(decode_both_ways(wire), reference)
    if num_values <= num_elements and (form == "values" or num_values == num_elements):
        assert_same_array(decode_both_ways(wire), decode_both_ways(wire, FROM_PROTO))


@pytest.mark.parametrize(
    ("fields", "dtype", "shape"),
    [
        (dict(scomplex_val=[1.0, 2.0, 3.0]), "complex64", [1]),  # a dangling imaginary-less part
        (dict(dcomplex_val=[1.0, 2.0, 3.0]), "complex128", [2]),
        (dict(int_val=[300, -1, 2**31 - 1]), "int8", [3]),  # int_val is int32: narrower dtypes wrap, as C++ casts
        (dict(int_val=[300, -1]), "uint8", [2]),
        (dict(half_val=[0x13C00, 5]), "float16", [2]),  # only the low 16 bits are a half
        (dict(tensor_content=b"abc"), "float32", [0, 3]),  # an empty shape reads no value at all
        (dict(float_val=[1.0, 2.0]), "float32", [0]),
        (dict(float_val=[1.0, 2.0, 3.0]), "float32", [2]),
    ],
)
def test_server_policy_edges_match_from_proto(fields: dict, dtype: str, shape: list[int]) -> None:
    wire = with_shape(TensorProto(dtype=tf.as_dtype(dtype).as_datatype_enum, **fields), tuple(shape))
    expected = from_proto_reference(wire, dtype)
    assert expected is not None
    assert_same_array(decode_both_ways(wire, FROM_PROTO), expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(float_val=[1.0, 2.0, 3.0]), "Expected at most 2"),
        (dict(tensor_content=b"\x00" * 12), "Expected 8 bytes"),
    ],
)
def test_client_policy_refuses_what_the_server_policy_cuts_or_skips(fields: dict, message: str) -> None:
    proto = _proto_with(**fields)
    with pytest.raises(codec.TensorDecodeError, match=message):
        codec.decode(proto)
    if "float_val" in fields:
        assert_same_array(codec.decode(proto, policy=FROM_PROTO), np.array([1.0, 2.0], np.float32))
    odd = with_shape(TensorProto(dtype=tf.complex64.as_datatype_enum, scomplex_val=[1.0, 2.0, 3.0]), (1,))
    with pytest.raises(codec.TensorDecodeError, match="odd number of parts"):
        decode_both_ways(odd)


def test_string_tensor_content_is_refused_under_both_policies() -> None:
    # TensorFlow's FromProto reads its string-list encoding; tf.make_ndarray refuses it, and so does this codec.
    wire = with_shape(TensorProto(dtype=tf.string.as_datatype_enum, tensor_content=b"\x01a"), (1,))
    for policy in codec.Policy:
        with pytest.raises(codec.TensorDecodeError, match="string_val"):
            decode_both_ways(wire, policy)


def test_dtype_table_is_tensorflows() -> None:
    for datatype, row in codec.DATATYPES.items():
        reference = tf.as_dtype(datatype)
        assert row.enum == datatype
        assert row.name == reference.name  # TensorFlow's Python names are numpy's, as the codec's
        if row.name != "string":
            assert row.numpy == np.dtype(reference.as_numpy_dtype)
        assert codec.numpy_dtype_of(datatype) == row.numpy
    assert codec.numpy_dtype_of(tf.resource.as_datatype_enum) is None
    # TF Serving's messages spell dtypes as C++'s DataTypeString does.
    spelled = {tf.float32: "float", tf.float16: "half", tf.bfloat16: "bfloat16", tf.int64: "int64", tf.string: "string"}
    for dtype, spelling in spelled.items():
        assert codec.datatype_string(dtype.as_datatype_enum) == spelling


@pytest.mark.parametrize(
    ("fields", "dims", "reason"),
    [
        (dict(dtype=tf.float32.as_datatype_enum), None,
         "tensor_shape has unknown_rank set; a request tensor needs a full shape"),
        (dict(dtype=tf.float32.as_datatype_enum), [-1], "tensor_shape [-1] has a negative dimension"),
        (dict(dtype=tf.resource.as_datatype_enum), [1], "dtype DT_RESOURCE is not supported"),
        (dict(dtype=tf.float32.as_datatype_enum, tensor_content=b"abc"), [2],
         "tensor_content holds 3 bytes but shape [2] of float needs 8"),
        (dict(dtype=tf.string.as_datatype_enum, tensor_content=b"\x01a"), [1],
         "string tensors cannot use tensor_content; use string_val"),
    ],
)  # fmt: skip
def test_the_server_answers_a_refused_tensor_as_tf_serving_does(fields: dict, dims: list | None, reason: str) -> None:
    from serving.server.errors import RpcStatus
    from serving.server.tensors import decode

    proto = TensorProto(**fields)
    if dims is None:
        proto.tensor_shape.unknown_rank = True
    for size in dims or []:
        proto.tensor_shape.dim.add(size=size)
    with pytest.raises(RpcStatus) as refused:
        decode(proto, "pixels")
    assert refused.value.code.name == "INVALID_ARGUMENT"
    assert refused.value.message == f"tensor parsing error: pixels: {reason}"
