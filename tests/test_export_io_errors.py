"""Exporter I/O failures and damaged checkpoints, produced for real: each ends in its own one-line error naming the
file and the fix, and leaves nothing in OUT_DIR.

Full and read-only file systems are real tmpfs mounts (root only; skipped otherwise, except read-only, which a
non-root user gets from directory permissions). The file-size limit is a real RLIMIT_FSIZE in an `ema-export`
subprocess.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

import ema_export
from ema_export.errors import CheckpointReadError, OutputDirError, OutputWriteError
from support import models as tm
from support.exporting import SEED_MODEL, launched, read_in_parts, run_export

MODEL = SEED_MODEL


run = run_export


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def assert_nothing_left(out: Path) -> None:
    """No version and no staging directory: nothing half-written where TF Serving (or anyone) could see it."""
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


def export_stages(ckpt: Path, out: Path) -> tuple[list[str], BaseException]:
    """Export through the library; return the stages that started and the error raised."""
    stages: list[str] = []
    with pytest.raises(ema_export.EmaExportError) as caught:
        ema_export.export(ckpt, out, model=tm.LinearModule, progress=stages.append)
    return stages, caught.value


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` at `mount_point`; skips the test where this process may not mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# --- Full disk: ENOSPC ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_disk_during_write_names_the_file_and_publishes_nothing(ckpt, tmp_path):
    with tmpfs(tmp_path / "small", "24k") as disk:  # room for the pre-flight probe, not for the SavedModel
        out = disk / "models"
        stages, error = export_stages(ckpt, out)
        assert isinstance(error, OutputWriteError)
        message = str(error)
        assert "no space left on the device holding OUT_DIR" in message and str(out) in message
        assert "of the export" in message and "No space left on device" in message  # the file, then TF's text
        assert "Free space there, or choose another OUT_DIR" in message
        assert stages[-1] in ("write SavedModel", "verify", "publish")
        assert_nothing_left(out)
        assert os.statvfs(disk).f_bfree == os.statvfs(disk).f_blocks, "the staging directory was removed"


def test_full_disk_while_large_variables_are_written_in_shards_names_the_shard(tmp_path):
    """Large variables are written by ema-export's own writer threads (`write.write_in_shards`), whose Python
    write errors carry no file name, beside TensorFlow's `SaveV2` writing the object graph's shard; whichever fails
    first, the message names the shard's file and the reason."""
    from ema_export.out_dir import output_write_error
    from ema_export.private_apis import SavedTensor
    from ema_export.write import write_in_shards

    with tmpfs(tmp_path / "small", "64k") as disk:
        staging = disk / "temp-export"
        (staging / "variables").mkdir(parents=True)
        with pytest.raises((OSError, tf.errors.OpError)) as raised:
            write_in_shards(str(staging / "variables" / "variables"),
                            [SavedTensor("weights", "", tf.zeros([256, 256])),  # 256 KiB
                             SavedTensor("_CHECKPOINTABLE_OBJECT_GRAPH", "", tf.constant(b"graph"))], writers=1)
        message = str(output_write_error(raised.value, disk, staging))
    assert re.search(r"Writing variables/variables_temp/part-0000[01]-of-00002\.data-00000-of-00001\S* of the export "
                     r"failed: no space left", message), message
    assert "No space left on device" in message.split("Received: ", 1)[1], message


def test_full_disk_is_noticed_before_restore(ckpt, tmp_path):
    with tmpfs(tmp_path / "full", "16k") as disk:
        (disk / "filler").write_bytes(b"\0" * 16 * 1024)  # tmpfs refuses the rest: the disk is now full
        out = disk / "models"
        stages, error = export_stages(ckpt, out)
        assert isinstance(error, OutputWriteError) and "no space left" in str(error)
        assert stages == [], "the pre-flight check runs before any stage"
        assert not out.exists() and sorted(p.name for p in disk.iterdir()) == ["filler"]


# --- File-size limit: EFBIG, in a subprocess with RLIMIT_FSIZE -------------------------------------------------

def _export_with_file_size_limit(ckpt: Path, out: Path, limit: int) -> subprocess.CompletedProcess:
    code = "import sys; from ema_export.cli import main; sys.argv[0] = 'ema-export'; main()"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(launched([sys.executable, "-c", code, str(ckpt), str(out), "--model", MODEL],
                                   file_size_limit=limit), env=env, capture_output=True, text=True, timeout=180,
                          check=False)


@pytest.mark.slow
@pytest.mark.parametrize(("limit", "file_written"), [(8192, "saved_model.pb of the export"), (1024, "a probe file in")],
                         ids=["tensorflow-write", "pre-flight-probe"])
def test_file_size_limit_is_named_with_the_limit(ckpt, tmp_path, limit, file_written):
    """EFBIG from TensorFlow writing saved_model.pb (8 KiB limit), and from Python writing the probe (1 KiB)."""
    out = tmp_path / "models"
    finished = _export_with_file_size_limit(ckpt, out, limit)
    assert finished.returncode == 1, finished.stderr  # not killed by SIGXFSZ: the CLI ignores it to report EFBIG
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert "exceeds this process's file-size limit" in lines[0] and f"RLIMIT_FSIZE {limit} bytes" in lines[0]
    assert file_written in lines[0] and "File too large" in lines[0] and "ulimit -f unlimited" in lines[0]
    assert_nothing_left(out)


# --- Read-only OUT_DIR, OUT_DIR under a file --------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write in: a read-only tmpfs for root (who ignores permissions), mode 0555 otherwise."""
    if os.geteuid() == 0:
        with tmpfs(tmp_path / "ro", "64k", read_only=True) as directory:
            yield directory, "is on a read-only file system"
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o555)
        yield directory, "is not writable by this user"
        directory.chmod(0o755)


@pytest.mark.parametrize("existing", [True, False], ids=["OUT_DIR-exists", "OUT_DIR-to-be-created"])
def test_read_only_out_dir_is_refused_before_restore_and_fold(ckpt, read_only_dir, existing):
    directory, why = read_only_dir
    out = directory if existing else directory / "models"
    stages, error = export_stages(ckpt, out)
    assert isinstance(error, OutputWriteError)
    assert why in str(error) and f"OUT_DIR {out}" in str(error) and "Choose another OUT_DIR" in str(error)
    assert stages == [], "noticed before locate, restore and fold"
    message = one_line_error(run(ckpt, out, "--model", MODEL))
    assert why in message


def test_out_dir_under_a_file_is_refused(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    out = tmp_path / "notes.txt" / "models" / "classifier"
    message = one_line_error(run(ckpt, out, "--model", MODEL))
    assert f"lies under {tmp_path / 'notes.txt'}, which is a file" in message and "Choose another OUT_DIR" in message
    with pytest.raises(OutputDirError, match="which is a file"):  # the dry run, which writes nothing, says so too
        ema_export.dry_run(ckpt, out, model=tm.LinearModule)


# --- Damaged checkpoints: which half, which file, what to do ---------------------------------------------------

def _prefix(ckpt: Path, role: str) -> Path:
    return ckpt / "ckpt-1" if role == "training" else ckpt / "ema" / "ckpt-1"


def test_corrupt_data_read_in_parts_is_the_same_one_line_error(ckpt, tmp_path, monkeypatch):
    """The restore's parallel read (here of a tiny model, a part per variable) fails on a damaged weight exactly as
    tf.train.Checkpoint's read does: one line naming the checkpoint and the file, nothing published."""
    reads = read_in_parts(monkeypatch)
    prefix = _prefix(ckpt, "training")
    data = Path(f"{prefix}.data-00000-of-00001")
    reader = tf.train.load_checkpoint(str(prefix))
    kernel = "weights/.ATTRIBUTES/VARIABLE_VALUE"  # the seed checkpoint's root holds the module's variables
    stored = data.read_bytes()
    at = stored.index(reader.get_tensor(kernel).tobytes())  # the kernel's bytes, and only the kernel's, are damaged
    data.write_bytes(stored[:at] + bytes([stored[at] ^ 0xFF]) + stored[at + 1:])
    message = one_line_error(run(ckpt, tmp_path / "models", "--model", MODEL))
    assert f"The training checkpoint {prefix} cannot be read" in message
    assert f"its data file {data} is corrupt: the stored bytes fail their checksum" in message
    assert [prefix for prefix, _ in reads] == [str(_prefix(ckpt, "training"))]  # the parallel read is what failed
    assert_nothing_left(tmp_path / "models")


@pytest.mark.parametrize("role", ["training", "EMA"])
def test_truncated_data_file_names_the_checkpoint_and_the_file(ckpt, tmp_path, role):
    data = Path(f"{_prefix(ckpt, role)}.data-00000-of-00001")
    with data.open("r+b") as handle:
        handle.truncate(10)  # an incomplete copy
    message = one_line_error(run(ckpt, tmp_path / "models", "--model", MODEL))
    assert f"The {role} checkpoint {_prefix(ckpt, role)} cannot be read" in message
    assert f"its data file {data} is shorter than its index says: truncated" in message
    assert "Read less bytes than requested" in message and "--step N" in message
    assert_nothing_left(tmp_path / "models")
    with pytest.raises(CheckpointReadError):
        ema_export.export(ckpt, tmp_path / "models", model=tm.LinearModule)


@pytest.mark.parametrize("role", ["training", "EMA"])
@pytest.mark.parametrize(("content", "described"),
                         [(b"", "is empty"), (b"not an index" * 8, "is not a checkpoint index (96 bytes)")],
                         ids=["empty", "garbage"])
def test_damaged_index_says_which_half(ckpt, tmp_path, role, content, described):
    index = Path(f"{_prefix(ckpt, role)}.index")
    index.write_bytes(content)
    message = one_line_error(run(ckpt, tmp_path / "models", "--model", MODEL))
    assert f"The {role} checkpoint {_prefix(ckpt, role)} cannot be read: its index {index} {described}" in message
    assert f"Copy the {role} checkpoint again" in message
    assert ("--ema-checkpoint" in message) == (role == "EMA")
    assert_nothing_left(tmp_path / "models")


def test_corrupt_data_bytes_fail_their_checksum(ckpt, tmp_path):
    data = Path(f"{_prefix(ckpt, 'EMA')}.data-00000-of-00001")
    data.write_bytes(bytes(byte ^ 0xFF for byte in data.read_bytes()))  # same size, every tensor's bytes flipped
    message = one_line_error(run(ckpt, tmp_path / "models", "--model", MODEL))
    assert f"The EMA checkpoint {_prefix(ckpt, 'EMA')} cannot be read" in message
    assert "fail their checksum" in message
