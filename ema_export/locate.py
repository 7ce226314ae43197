"""Stage 1, locate: find the training checkpoint and its EMA checkpoint, and say which files they are.

A directory means "the latest checkpoint recorded in its `checkpoint` state file"; anything else is taken as a
checkpoint prefix (`.../ckpt-7`), which must have an `.index` file beside it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ema_export.contracts import EMA_CHECKPOINT_SUBDIR
from ema_export.errors import CheckpointNotFoundError

_STATE_FILENAME = "checkpoint"
KERAS_FILE_SUFFIXES = (".weights.h5", ".keras")
"""Keras's own files, which hold model weights and (when compiled) optimizer variables, EMA averages included."""
SAVED_MODEL_VARIABLES = "variables/variables"
"""The checkpoint prefix inside a SavedModel directory."""
_PATH_IN_STATE = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)


@dataclass(frozen=True)
class CheckpointFiles:
    """One TensorFlow checkpoint: its prefix, the files that make it up, and how it was chosen."""

    prefix: str
    files: tuple[str, ...]
    chosen_by: str
    step: int | None = None
    step_source: str = ""

    @property
    def is_keras_file(self) -> bool:
        """A `.keras` archive or `.weights.h5` file rather than a TensorFlow checkpoint."""
        return self.prefix.endswith(KERAS_FILE_SUFFIXES)

    @property
    def number(self) -> int | None:
        """The `-N` suffix TensorFlow's `save()` puts on a prefix, or the last number in a Keras file's name
        (`model-03.keras`, `ckpt-12.weights.h5`, as `ModelCheckpoint` fills in `{epoch}`), if there is one."""
        if self.is_keras_file:
            return keras_file_number(os.path.basename(self.prefix))
        match = re.search(r"-(\d+)$", self.prefix)
        return int(match.group(1)) if match else None


def keras_file_number(name: str) -> int | None:
    """The last number in a Keras file's name: the epoch or step `ModelCheckpoint` wrote into it."""
    numbers = re.findall(r"\d+", name.removesuffix(".weights.h5").removesuffix(".keras"))
    return int(numbers[-1]) if numbers else None


def _newest_keras_file(directory: Path, role: str, flag: str, step: int | None) -> CheckpointFiles | None:
    """The Keras file to use among several in one directory (`ModelCheckpoint("model-{epoch:02d}.keras")`): the one
    with the highest number in its name, or number `step`. None when the directory holds no Keras file."""
    files = sorted(str(p) for suffix in KERAS_FILE_SUFFIXES for p in directory.glob("*" + suffix))
    if not files:
        return None
    if len(files) == 1 and step is None:
        return CheckpointFiles(files[0], (files[0],), f"only Keras file in {directory}")
    by_number: dict[int, list[str]] = {}
    for path in files:
        number = keras_file_number(os.path.basename(path))
        if number is not None:
            by_number.setdefault(number, []).append(path)
    listing = ", ".join(os.path.basename(p) for p in files)
    chosen = step if step is not None else max(by_number, default=None)
    if chosen is None or chosen not in by_number or len(by_number[chosen]) > 1:
        problem = (f"has no Keras file numbered {step}" if step is not None and step not in by_number
                   else f"has {len(files)} Keras files and cannot tell which is newest")
        raise CheckpointNotFoundError(
            f"The {role} directory {directory} {problem}",
            hint=f"Pass one file with {flag}, or pick a number with --step N. Received: {listing}",
        )
    how = (f"number {chosen} given with --step" if step is not None
           else f"newest by the number in its name, of {len(files)} Keras files in {directory}; --step N picks another")
    path = by_number[chosen][0]
    return CheckpointFiles(path, (path,), how)


@dataclass(frozen=True)
class CheckpointSources:
    """The pair of checkpoints an export reads, and whether their steps were allowed to differ."""

    training: CheckpointFiles
    ema: CheckpointFiles | None
    checkpoint_dir: str
    step_mismatch_allowed: bool = False


def _files_of(prefix: str) -> tuple[str, ...]:
    folder, base = os.path.split(prefix)
    names = sorted(
        name for name in os.listdir(folder or ".") if name == base + ".index" or name.startswith(base + ".data-")
    )
    return tuple(os.path.join(folder, name) for name in names)


def _latest_in_directory(directory: Path, role: str, flag: str, step: int | None = None) -> CheckpointFiles:
    saved_model = directory / SAVED_MODEL_VARIABLES
    if (directory / "saved_model.pb").is_file() and Path(str(saved_model) + ".index").is_file():
        # tf-keras ModelCheckpoint's default output is a SavedModel directory; its variables are a checkpoint.
        return CheckpointFiles(str(saved_model), _files_of(str(saved_model)),
                               f"variables of the SavedModel in {directory}")
    state = directory / _STATE_FILENAME
    if state.is_file():
        match = _PATH_IN_STATE.search(state.read_text(errors="replace"))
        if match:
            recorded = match.group(1)
            # A state file written on another machine may hold an absolute path that no longer exists: the
            # checkpoint is then looked for beside the state file, which is where TensorFlow wrote it.
            candidates = [recorded] if os.path.isabs(recorded) else []
            candidates.append(str(directory / os.path.basename(recorded)))
            for candidate in candidates:
                if os.path.isfile(candidate + ".index"):
                    return CheckpointFiles(candidate, _files_of(candidate), f"latest in {state}")
            raise CheckpointNotFoundError(
                f"The {role} state file {state} names checkpoint {recorded!r}, but its .index file is missing",
                hint=f"Restore the checkpoint files, or pass a checkpoint prefix directly with {flag}",
            )
    prefixes = sorted({str(p)[: -len(".index")] for p in directory.glob("*.index")})
    if not prefixes:
        keras_file = _newest_keras_file(directory, role, flag, step)
        if keras_file is not None:
            return keras_file
    if len(prefixes) == 1:
        return CheckpointFiles(prefixes[0], _files_of(prefixes[0]), f"only checkpoint in {directory}")
    if prefixes:
        raise CheckpointNotFoundError(
            f"The {role} directory {directory} has {len(prefixes)} checkpoints but no `checkpoint` state file to say "
            "which is latest",
            hint=f"Pass one prefix with {flag}. Received: " + ", ".join(os.path.basename(p) for p in prefixes),
        )
    raise CheckpointNotFoundError(
        f"No {role} checkpoint in {directory}: expected a `checkpoint` state file or `<prefix>.index` files",
        hint=f"Point {flag} at the directory training saved into, or at a checkpoint prefix such as .../ckpt-1",
    )


def resolve_checkpoint(path: str | os.PathLike, role: str, flag: str, step: int | None = None) -> CheckpointFiles:
    """Resolve a directory or a prefix to one checkpoint.

    Args:
        path: A checkpoint directory (its latest checkpoint is used) or a checkpoint prefix.
        role: "training" or "EMA", for messages.
        flag: The command-line argument that sets this path, for hints.
        step: In a directory of numbered Keras files, the number of the one to use (default: the highest).

    Raises:
        CheckpointNotFoundError: Nothing readable is there.
    """
    path = Path(path)
    if path.is_dir():
        return _latest_in_directory(path, role, flag, step)
    prefix = str(path)
    if path.is_file() and prefix.endswith(KERAS_FILE_SUFFIXES):
        return CheckpointFiles(prefix, (prefix,), "given as a Keras file")
    if prefix.endswith(".index"):
        prefix = prefix[: -len(".index")]
    elif ".data-" in os.path.basename(prefix):
        prefix = prefix[: prefix.rindex(".data-")]
    if os.path.isfile(prefix + ".index"):
        return CheckpointFiles(prefix, _files_of(prefix), "given as a prefix")
    raise CheckpointNotFoundError(
        f"The {role} checkpoint {str(path)!r} is neither a directory nor a checkpoint prefix with an .index file",
        hint=f"Check the path given as {flag}",
    )


STEP_VARIABLES = ("step", "global_step", "train_step")
"""Root-level variables that record the training step, as the training helpers and common loops save them."""


def read_step(files: CheckpointFiles, role: str) -> CheckpointFiles:
    """The checkpoint with its step: a step variable saved in it, else the `-N` number of its prefix."""
    if not files.is_keras_file:
        from ema_export.read import open_index

        index = open_index(files.prefix, role)
        for name in STEP_VARIABLES:
            for key in (f"{name}/.ATTRIBUTES/VARIABLE_VALUE", name):
                if key in index.shapes:
                    step = int(index.reader.get_tensor(key))
                    return dataclasses.replace(files, step=step, step_source=f"variable {name}")
    if files.number is not None:
        return dataclasses.replace(files, step=files.number, step_source="checkpoint number")
    return files


def _resolve_for_pairing(path: str | os.PathLike, role: str, flag: str, step: int | None = None) -> CheckpointFiles:
    """Like `resolve_checkpoint`, but with `--step` a directory whose state file names deleted files still offers its
    checkpoints for pairing by number (the step, not the state file, then says which pair is wanted).

    Without `--step` such a state file is refused: the newest checkpoint still on disk is not the one training last
    recorded, and exporting it silently would publish older weights than the user expects.
    """
    try:
        return resolve_checkpoint(path, role, flag, step)
    except CheckpointNotFoundError as error:
        numbered = _numbered(Path(path)) if Path(path).is_dir() else {}
        if not numbered:
            raise
        if step is None and (Path(path) / _STATE_FILENAME).is_file():
            on_disk = ", ".join(os.path.basename(numbered[number]) for number in sorted(numbered))
            raise CheckpointNotFoundError(
                f"{error.message}. On disk: {on_disk}",
                hint=f"Restore the missing files, or choose what is on disk with --step N (e.g. --step "
                f"{max(numbered)}) or a prefix such as {numbered[max(numbered)]}",
            ) from None
        prefix = numbered[max(numbered)]
        return CheckpointFiles(prefix, _files_of(prefix), f"newest in {path} (its state file names missing files)")


_NUMBERED_INDEX = re.compile(r"^(?P<base>.+)-(?P<number>\d+)\.index$")


def _numbered(directory: Path, base: str | None = None) -> dict[int, str]:
    """`<base>-N` prefixes (any base when None) with an .index file in `directory`, by N."""
    found = {}
    for index_file in directory.glob("*-*.index"):
        match = _NUMBERED_INDEX.match(index_file.name)
        if match and (base is None or match["base"] == base):
            found[int(match["number"])] = str(index_file)[: -len(".index")]
    return found


def _base_name(files: CheckpointFiles) -> str:
    return re.sub(r"-\d+$", "", os.path.basename(files.prefix))


def _pair_in_directories(training: CheckpointFiles, ema: CheckpointFiles, step: int | None,
                         ema_explicit: bool) -> tuple[CheckpointFiles, CheckpointFiles]:
    """Pair the two directories' checkpoints by number: `step`, else the newest number both have."""
    live_numbers = _numbered(Path(training.prefix).parent, _base_name(training))
    ema_numbers = _numbered(Path(ema.prefix).parent, _base_name(ema))
    common = sorted(set(live_numbers) & set(ema_numbers))
    if step is not None:
        if step not in common:
            raise CheckpointNotFoundError(
                f"No complete checkpoint pair for step {step}: training has "
                f"{'it' if step in live_numbers else 'no such checkpoint'}, EMA has "
                f"{'it' if step in ema_numbers else 'no such checkpoint'}",
                hint="Pick a step both have with --step. Received: complete pairs at steps "
                + (", ".join(map(str, common)) or "none"),
            )
        chosen = step
    elif not common:
        return training, ema  # not numbered alike: the caller compares their steps
    else:
        chosen = common[-1]
    how = f"step {chosen} given with --step" if step is not None else f"latest complete pair (step {chosen})"
    if step is None and training.number is not None and training.number != chosen and not ema_explicit:
        how += (f"; the newer training checkpoint {os.path.basename(training.prefix)} has no EMA partner "
                "(interrupted between the two saves?)")
    live_prefix, ema_prefix = live_numbers[chosen], ema_numbers[chosen]
    return (CheckpointFiles(live_prefix, _files_of(live_prefix), how),
            CheckpointFiles(ema_prefix, _files_of(ema_prefix), how))


def locate(checkpoint: str | os.PathLike, ema_checkpoint: str | os.PathLike | None = None,
           require_ema: bool = False, step: int | None = None,
           allow_step_mismatch: bool = False) -> CheckpointSources:
    """Find the training checkpoint and the EMA checkpoint of the same step.

    Checkpoints in directories are paired by their numbers (`ckpt-N` with `ema/ckpt-N`): the newest number both
    have, or `step`. Checkpoints named explicitly must record the same step (a step variable, or their numbers).

    Args:
        checkpoint: CKPT_DIR or a training checkpoint prefix.
        ema_checkpoint: Directory or prefix of the EMA checkpoint; default `<CKPT_DIR>/ema/`.
        require_ema: Raise when no separate EMA checkpoint exists; by default its absence is left to the layouts,
            several of which keep the shadows inside the training checkpoint.
        step: Export this step's pair instead of the newest.
        allow_step_mismatch: Accept an explicit pair whose steps differ (recorded in the manifest).

    Raises:
        CheckpointNotFoundError: Either checkpoint is missing or ambiguous, or the steps do not pair.
    """
    training = _resolve_for_pairing(checkpoint, "training", "CKPT_DIR", step)
    checkpoint_dir = str(checkpoint) if Path(checkpoint).is_dir() else os.path.dirname(training.prefix)
    if ema_checkpoint is not None:
        ema: CheckpointFiles | None = _resolve_for_pairing(ema_checkpoint, "EMA", "--ema-checkpoint")
        if os.path.realpath(ema.prefix) == os.path.realpath(training.prefix):
            raise CheckpointNotFoundError(
                f"--ema-checkpoint resolves to the training checkpoint itself ({training.prefix}); its values are "
                "the live weights, not their averages",
                hint="Point --ema-checkpoint at the checkpoint the EMA shadows were saved to (by default CKPT_DIR/ema/)",
            )
    elif (Path(checkpoint_dir) / EMA_CHECKPOINT_SUBDIR).is_dir():
        ema = _resolve_for_pairing(Path(checkpoint_dir) / EMA_CHECKPOINT_SUBDIR, "EMA", "--ema-checkpoint")
    elif require_ema:
        raise CheckpointNotFoundError(
            f"No EMA checkpoint: expected a directory {Path(checkpoint_dir) / EMA_CHECKPOINT_SUBDIR} holding the "
            "shadows saved beside the training checkpoint",
            hint="Pass its location with --ema-checkpoint PATH (a directory or a prefix)",
        )
    else:
        ema = None
    if ema is None or training.is_keras_file or ema.is_keras_file:
        if step is not None and training.number != step:
            raise CheckpointNotFoundError(f"--step {step} given, but the training checkpoint is "
                                          f"{training.prefix} and there is no EMA checkpoint to pair",
                                          hint="Pass CKPT_DIR/ckpt-N directly, or drop --step")
        return CheckpointSources(read_step(training, "training"), ema, checkpoint_dir)
    both_directories = Path(checkpoint).is_dir() and (ema_checkpoint is None or Path(ema_checkpoint).is_dir())
    if both_directories or step is not None:
        training, ema = _pair_in_directories(training, ema, step, ema_checkpoint is not None)
    training, ema = read_step(training, "training"), read_step(ema, "EMA")
    mismatch = training.step is not None and ema.step is not None and training.step != ema.step
    if mismatch and not allow_step_mismatch:
        raise CheckpointNotFoundError(
            f"The training checkpoint is at step {training.step} ({training.step_source}) but the EMA checkpoint is "
            f"at step {ema.step} ({ema.step_source}): exporting them together would pair weights and averages from "
            "different moments",
            hint=f"Pass the pair of one step (--step N), or --allow-step-mismatch to export them anyway. Received: "
            f"{training.prefix} and {ema.prefix}",
        )
    return CheckpointSources(training, ema, checkpoint_dir, step_mismatch_allowed=mismatch)
