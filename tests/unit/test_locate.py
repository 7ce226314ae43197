"""locate: which checkpoint files a path names, and how training and EMA checkpoints pair by step.

Resolution only looks at file names, so empty files stand in for checkpoints there; pairing reads each checkpoint's
step, so those tests write real one-variable checkpoints (a few milliseconds each, no model, no export).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow as tf

from ema_export.errors import CheckpointNotFoundError
from ema_export.locate import CheckpointFiles, locate, resolve_checkpoint


def _touch_checkpoint(prefix: Path) -> None:
    """The two files of a checkpoint prefix, empty: enough for name-based resolution."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").touch()
    Path(f"{prefix}.data-00000-of-00001").touch()


def _write_checkpoint(prefix: Path, step: int | None = None) -> None:
    """A real checkpoint at `prefix`, recording `step` in a `step` variable when given."""
    variables = {"weight": tf.Variable(1.0)}
    if step is not None:
        variables["step"] = tf.Variable(step, dtype=tf.int64)
    tf.train.Checkpoint(**variables).write(str(prefix))


def _write_pairs(directory: Path, training_numbers: list[int], ema_numbers: list[int]) -> None:
    for number in training_numbers:
        _write_checkpoint(directory / f"ckpt-{number}")
    for number in ema_numbers:
        _write_checkpoint(directory / "ema" / f"ckpt-{number}")


@pytest.mark.parametrize(("prefix", "number"), [("ckpt-7", 7), ("dir-3/model.ckpt-120", 120), ("model", None),
                                                 ("ckpt-", None), ("ckpt-2-final", None)])
def test_number_is_the_numeric_suffix_of_the_prefix(prefix, number):
    assert CheckpointFiles(prefix, (), "test").number == number


@pytest.mark.parametrize("suffix", ["", ".index", ".data-00000-of-00001"])
def test_a_prefix_or_any_of_its_files_resolves_to_the_prefix(tmp_path, suffix):
    _touch_checkpoint(tmp_path / "ckpt-4")
    _touch_checkpoint(tmp_path / "ckpt-40")  # shares the leading characters, must not be listed as ckpt-4's file
    files = resolve_checkpoint(f"{tmp_path / 'ckpt-4'}{suffix}", "training", "CKPT_DIR")
    assert files.prefix == str(tmp_path / "ckpt-4")
    assert [Path(name).name for name in files.files] == ["ckpt-4.data-00000-of-00001", "ckpt-4.index"]
    assert files.chosen_by == "given as a prefix"


def test_the_state_file_chooses_among_several_checkpoints(tmp_path):
    for number in (1, 2, 3):
        _touch_checkpoint(tmp_path / f"ckpt-{number}")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-3"\n')
    files = resolve_checkpoint(tmp_path, "training", "CKPT_DIR")
    assert files.prefix == str(tmp_path / "ckpt-2")
    assert "latest in" in files.chosen_by


def test_an_absolute_path_from_another_machine_is_looked_for_beside_the_state_file(tmp_path):
    _touch_checkpoint(tmp_path / "ckpt-5")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run/ckpt-5"\n')
    assert resolve_checkpoint(tmp_path, "training", "CKPT_DIR").prefix == str(tmp_path / "ckpt-5")


def test_a_state_file_naming_a_missing_checkpoint_is_an_error_naming_the_flag(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    with pytest.raises(CheckpointNotFoundError, match="ckpt-9.*--ema-checkpoint"):
        resolve_checkpoint(tmp_path, "EMA", "--ema-checkpoint")


def test_several_checkpoints_without_a_state_file_are_listed_not_guessed(tmp_path):
    _touch_checkpoint(tmp_path / "ckpt-1")
    _touch_checkpoint(tmp_path / "ckpt-2")
    with pytest.raises(CheckpointNotFoundError) as raised:
        resolve_checkpoint(tmp_path, "training", "CKPT_DIR")
    assert "2 checkpoints" in str(raised.value) and "ckpt-1, ckpt-2" in str(raised.value)


def test_a_single_checkpoint_or_keras_file_needs_no_state_file(tmp_path):
    _touch_checkpoint(tmp_path / "tf" / "only-1")
    assert resolve_checkpoint(tmp_path / "tf", "training", "CKPT_DIR").chosen_by.startswith("only checkpoint")
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "model.weights.h5").touch()
    files = resolve_checkpoint(tmp_path / "keras", "training", "CKPT_DIR")
    assert (files.prefix, files.is_keras_file) == (str(tmp_path / "keras" / "model.weights.h5"), True)


@pytest.mark.parametrize("target", ["empty", "missing"])
def test_nothing_to_resolve_is_an_error(tmp_path, target):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="CKPT_DIR"):
        resolve_checkpoint(tmp_path / target, "training", "CKPT_DIR")


def test_directories_pair_on_the_newest_number_both_have(tmp_path):
    _write_pairs(tmp_path, training_numbers=[1, 2, 3], ema_numbers=[1, 2])
    sources = locate(tmp_path)
    assert Path(sources.training.prefix).name == Path(sources.ema.prefix).name == "ckpt-2"
    assert sources.training.step == sources.ema.step == 2
    assert sources.training.step_source == "checkpoint number"
    assert "ckpt-3 has no EMA partner" in sources.training.chosen_by
    assert not sources.step_mismatch_allowed


def test_step_chooses_an_older_pair(tmp_path):
    _write_pairs(tmp_path, training_numbers=[1, 2], ema_numbers=[1, 2])
    sources = locate(tmp_path, step=1)
    assert (sources.training.step, sources.ema.step) == (1, 1)
    assert "given with --step" in sources.training.chosen_by


def test_a_step_without_a_complete_pair_lists_the_pairs_there_are(tmp_path):
    _write_pairs(tmp_path, training_numbers=[1, 2, 3], ema_numbers=[1, 2])
    with pytest.raises(CheckpointNotFoundError) as raised:
        locate(tmp_path, step=3)
    message = str(raised.value)
    assert "training has it, EMA has no such checkpoint" in message and "steps 1, 2" in message


def test_explicit_prefixes_must_record_the_same_step(tmp_path):
    _write_checkpoint(tmp_path / "live", step=10)
    _write_checkpoint(tmp_path / "average", step=12)
    with pytest.raises(CheckpointNotFoundError, match="step 10 .*variable step.* step 12.*--allow-step-mismatch"):
        locate(tmp_path / "live", tmp_path / "average")
    sources = locate(tmp_path / "live", tmp_path / "average", allow_step_mismatch=True)
    assert (sources.training.step, sources.ema.step, sources.step_mismatch_allowed) == (10, 12, True)


def test_a_step_variable_outranks_the_prefix_number(tmp_path):
    _write_checkpoint(tmp_path / "ckpt-1", step=500)
    sources = locate(tmp_path / "ckpt-1")
    assert (sources.training.step, sources.training.step_source, sources.ema) == (500, "variable step", None)


def test_the_ema_checkpoint_cannot_be_the_training_checkpoint(tmp_path):
    _write_checkpoint(tmp_path / "ckpt-1")
    with pytest.raises(CheckpointNotFoundError, match="resolves to the training checkpoint itself"):
        locate(tmp_path / "ckpt-1", tmp_path / "ckpt-1.index")


def test_require_ema_names_the_default_location_and_the_flag(tmp_path):
    _write_checkpoint(tmp_path / "ckpt-1")
    assert locate(tmp_path).ema is None
    with pytest.raises(CheckpointNotFoundError, match=r"ema.*--ema-checkpoint"):
        locate(tmp_path, require_ema=True)


def test_a_stale_state_file_is_refused_naming_what_is_missing_and_what_is_on_disk(tmp_path):
    _write_pairs(tmp_path, training_numbers=[1, 4, 5], ema_numbers=[1, 4])
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\n')  # ckpt-7's files are gone
    with pytest.raises(CheckpointNotFoundError) as raised:
        locate(tmp_path)
    assert "'ckpt-7'" in raised.value.message and "On disk: ckpt-1, ckpt-4, ckpt-5" in raised.value.message
    assert "--step" in raised.value.hint


def test_a_stale_state_file_still_pairs_by_number_when_the_step_is_given(tmp_path):
    _write_pairs(tmp_path, training_numbers=[1, 4, 5], ema_numbers=[1, 4])
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\n')
    sources = locate(tmp_path, step=4)
    assert (sources.training.step, sources.ema.step) == (4, 4)
    explicit = locate(tmp_path / "ckpt-1", ema_checkpoint=tmp_path / "ema" / "ckpt-1")
    assert (explicit.training.step, explicit.ema.step) == (1, 1)
