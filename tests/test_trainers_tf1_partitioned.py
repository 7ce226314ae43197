"""TF1 partitioned variables (item 4 of issue 23): `get_variable(..., partitioner=fixed_size_partitioner(2))` trains
parts `model/embedding/part_<i>`, but the Saver stores the variable and its EMA shadow whole. A `--model` creating the
parts as training did has each restored from its slice; parts that do not tile the saved whole are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from ema_export.read import ROLE_TRAINING, open_index
from ema_export.restore_by_name import PartSlice, tile
from support.exporting import run_export

NUM_ROWS, WIDTH, NUM_CLASSES = 100, 4, 3
PROBE = np.array([0, 7, 49, 50, 63, 99], np.int64)
"""Ids from both halves of the embedding, either side of the cut between its two parts."""

PARTS = (("model/embedding/part_0", [50, WIDTH]), ("model/embedding/part_1", [50, WIDTH]))
WHOLE = (("model/embedding", [NUM_ROWS, WIDTH]),)


class EmbeddingModel(tf.Module):
    """What `--model` builds: the training graph's variables as `tf.Variable`s named as training named them (the
    embedding as the given (name, shape) parts) and its forward pass as a serving function."""

    def __init__(self, parts) -> None:
        super().__init__()
        self.embedding = [tf.Variable(tf.zeros(shape), name=name) for name, shape in parts]
        self.dense = tf.Variable(tf.zeros([WIDTH, NUM_CLASSES]), name="model/dense")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def __call__(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.nn.embedding_lookup(self.embedding, ids), self.dense)


def train_partitioned(ckpt_dir) -> dict[str, np.ndarray]:
    """Real producer: a TF1 graph whose embedding is partitioned in two by `fixed_size_partitioner`, a few
    GradientDescent steps with an EMA applied after each, `Saver.save`. Returns what the training graph computes on
    PROBE with the live weights and with the EMA's shadows."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        # A graph seed, not an op seed: an op seed would initialize both parts alike.
        tf.compat.v1.set_random_seed(0)
        with tf.compat.v1.variable_scope("model"):
            embedding = tf.compat.v1.get_variable(
                "embedding", [NUM_ROWS, WIDTH], partitioner=tf.compat.v1.fixed_size_partitioner(2),
                initializer=tf.compat.v1.random_normal_initializer())
            dense = tf.compat.v1.get_variable("dense", [WIDTH, NUM_CLASSES],
                                              initializer=tf.compat.v1.random_normal_initializer())
        ids = tf.compat.v1.placeholder(tf.int64, [None])
        targets = tf.compat.v1.placeholder(tf.float32, [None, NUM_CLASSES])

        def forward(table, kernel):
            return tf.matmul(tf.nn.embedding_lookup(table, ids), kernel)

        loss = tf.reduce_sum(tf.square(forward(embedding, dense) - targets))
        train = tf.compat.v1.train.GradientDescentOptimizer(0.002).minimize(loss)
        average = tf.compat.v1.train.ExponentialMovingAverage(0.5)
        with tf.control_dependencies([train]):
            update = average.apply(tf.compat.v1.trainable_variables())
        live = forward(embedding, dense)
        averaged = forward([average.average(part) for part in embedding], average.average(dense))
        session.run(tf.compat.v1.global_variables_initializer())
        rng = np.random.default_rng(0)
        for _ in range(3):
            session.run(update, {ids: np.arange(NUM_ROWS),
                                 targets: rng.standard_normal((NUM_ROWS, NUM_CLASSES)).astype(np.float32)})
        tf.compat.v1.train.Saver().save(session, str(ckpt_dir / "model.ckpt"), global_step=3)
        return dict(zip((SIGNATURE_LIVE, SIGNATURE_EMA), session.run([live, averaged], {ids: PROBE})))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The checkpoint directory (trained once for the module) and what training computed on PROBE per arm."""
    ckpt_dir = tmp_path_factory.mktemp("partitioned")
    return ckpt_dir, train_partitioned(ckpt_dir)


def model_spec(tmp_path, monkeypatch, name: str, parts) -> str:
    """A `--model MODULE:FACTORY` building `EmbeddingModel(parts)`, as a module of the user's own in `tmp_path`."""
    (tmp_path / f"{name}.py").write_text(f"from {__name__} import EmbeddingModel\n\n\n"
                                         f"def build():\n    return EmbeddingModel({parts!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build"


@pytest.mark.slow
@pytest.mark.parametrize("parts", [PARTS, WHOLE], ids=["parts-as-trained", "one-whole-variable"])
def test_partitioned_embedding_exports_as_its_parts_or_as_one_variable(trained, tmp_path, monkeypatch, parts):
    ckpt_dir, expected = trained
    spec = model_spec(tmp_path, monkeypatch, f"partitioned_{len(parts)}", parts)
    result = run_export(ckpt_dir, tmp_path / "models", "--model", spec, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)

    assert manifest["layout"]["name"] == "tf1-names"
    folded = {item["name"]: item["shadow_key"] for item in manifest["variables"]["folded"]}
    assert folded == {**{name: "model/embedding/ExponentialMovingAverage" for name, _ in parts},
                      "model/dense": "model/dense/ExponentialMovingAverage"}
    assert not np.allclose(expected[SIGNATURE_LIVE], expected[SIGNATURE_EMA])
    loaded = tf.saved_model.load(manifest["version_dir"])
    for signature in (SIGNATURE_LIVE, SIGNATURE_EMA):
        served = loaded.signatures[signature](ids=tf.constant(PROBE))["output_0"].numpy()
        np.testing.assert_allclose(served, expected[signature], rtol=1e-5, atol=1e-6, err_msg=signature)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parts, reason",
    [
        ((("model/embedding/part_0", [60, WIDTH]), ("model/embedding/part_1", [50, WIDTH])),
         "along axis 0 they add up to 110, not 100"),
        ((("model/embedding/part_0", [50, WIDTH]), ("model/embedding/part_2", [50, WIDTH])), "part_1 is missing"),
    ],
    ids=["sizes-do-not-add-up", "a-part-missing"],
)
def test_parts_that_do_not_tile_the_saved_whole_are_refused_in_one_line(trained, tmp_path, monkeypatch, parts,
                                                                        reason):
    ckpt_dir, _ = trained
    spec = model_spec(tmp_path, monkeypatch, f"untiled_{parts[1][0].rsplit('_', 1)[-1]}", parts)
    result = run_export(ckpt_dir, tmp_path / "models", "--model", spec)

    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    line = lines[0]
    assert len(line) < 300, line
    assert "model.ckpt-3 holds model/embedding whole, [100, 4], which the model's parts do not tile" in line
    assert reason in line
    assert "--model must create parts that tile it along one axis, or one variable model/embedding of [100, 4]" in line
    (first, first_shape), (second, second_shape) = parts
    assert f"Received: {first} {first_shape}, {second.rsplit('/', 1)[-1]} {second_shape}" in line
    assert "no entry of that name" not in line
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# --- Which slice each part is: pure functions, fast --------------------------------------------------------------


@pytest.mark.parametrize(
    "whole, parts, slices",
    [
        ([100, 4], {0: [50, 4], 1: [50, 4]}, [(0, 0, 50), (0, 50, 50)]),
        ([10, 6], {0: [10, 2], 1: [10, 4]}, [(1, 0, 2), (1, 2, 4)]),
        ([7], {0: [4], 1: [3]}, [(0, 0, 4), (0, 4, 3)]),
        ([100, 4], {0: [100, 4]}, [(0, 0, 100)]),
    ],
    ids=["two-halves", "along-axis-1", "uneven-vector", "one-part"],
)
def test_parts_that_tile_the_whole_get_consecutive_slices(whole, parts, slices):
    assert tile(whole, parts) == [PartSlice(tuple(whole), axis, start, length) for axis, start, length in slices]


@pytest.mark.parametrize(
    "parts, reason",
    [
        ({0: [60, 4], 1: [50, 4]}, "along axis 0 they add up to 110, not 100"),
        ({0: [50, 4], 2: [50, 4]}, "part_1 is missing"),
        ({1: [50, 4]}, "part_0 is missing"),
        ({0: [50, 3], 1: [50, 3]}, "each differs from it on more than one axis"),
        ({0: [50], 1: [50]}, "their ranks (1, 1) are not its rank, 2"),
    ],
    ids=["sizes-do-not-add-up", "a-part-missing", "the-first-part-missing", "other-axes-differ", "other-rank"],
)
def test_parts_that_do_not_tile_the_whole_say_why(parts, reason):
    assert tile([100, 4], parts) == reason


def test_a_part_reads_just_its_slice(tmp_path):
    """The slice RestoreV2 reads by the part's spec is the slice numpy takes from the whole tensor."""
    whole = np.arange(24, dtype=np.float32).reshape(6, 4)
    prefix = tf.train.Checkpoint(table=tf.Variable(whole)).write(str(tmp_path / "c"))
    part = tile([6, 4], {0: [2, 4], 1: [4, 4]})[1]
    assert (part.spec, part.shape) == ("6 4 2,4:-", (4, 4))
    read = part.read(open_index(prefix, ROLE_TRAINING), "table/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(read.numpy(), whole[2:])
    np.testing.assert_array_equal(part.of(whole), whole[2:])
