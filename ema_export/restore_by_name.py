"""Restore live values from a name-based checkpoint (TF1 `tf.compat.v1.train.Saver`), strictly.

A Saver checkpoint has no object graph: entries are keyed by variable names (`dense/kernel`,
`weights`). Each model variable is looked up by its own name (`v.name` without `:0`, or its Keras path); when the
model wraps the trained variables in an extra scope (`classifier/dense/kernel` for a saved `dense/kernel`), a unique
match on whole trailing name components is accepted. A name that fits several entries is an error listing them.

A TF1 partitioned variable (`get_variable(..., partitioner=...)`) trains as parts `<name>/part_<i>`, but the Saver
stores it whole under `<name>`. A model that creates the parts as training did has each part restored from its
slice of that entry, when the parts tile it along one axis in part order; otherwise the export is refused, naming
the saved shape.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ema_export.checkpoint_graph import children_of, variable_identity
from ema_export.errors import RestoreError, name_list
from ema_export.fresh_model import FreshModel
from ema_export.locate import CheckpointFiles
from ema_export.read import CheckpointIndex, read_entry
from ema_export.restored import RestoredModel, RestoredVariable

PART_NAME = re.compile(r"^(?P<base>.+)/part_(?P<index>\d+)$")
"""How TF1 names the parts of a partitioned variable: `<variable>/part_<i>`."""


def variable_names(variable: Any) -> list[str]:
    """Names a variable may have been saved under, most specific first."""
    names = []
    path = getattr(variable, "path", None) if not isinstance(variable, tf.Variable) else None
    if path:
        names.append(path)
    inner = getattr(variable, "value", variable)
    name = getattr(inner if isinstance(inner, tf.Variable) else variable, "name", "")
    if name:
        names.append(name.rsplit(":", 1)[0])
    return list(dict.fromkeys(names))


def _trailing_match(name: str, keys: list[str]) -> list[str]:
    """Keys equal to `name` with leading scopes removed, or that extend `name` by leading scopes."""
    return [key for key in keys if name.endswith("/" + key) or key.endswith("/" + name)]


def _find_key(names: Sequence[str], keys: list[str]) -> tuple[str | None, list[str]]:
    """The key one of `names` (most specific first) is saved under, or (None, candidates) when none or several."""
    for name in names:
        if name in keys:
            return name, []
    for name in names:
        candidates = _trailing_match(name, keys)
        if len(candidates) == 1:
            return candidates[0], []
        if candidates:
            return None, candidates
    return None, []


def find_entry(variable: Any, keys: list[str]) -> tuple[str | None, list[str]]:
    """The checkpoint key holding `variable`, or (None, candidates) when there is none or several."""
    return _find_key(variable_names(variable), keys)


# --- TF1 partitioned variables -----------------------------------------------------------------------------------


def part_of(name: str) -> tuple[str, int] | None:
    """`model/embedding/part_1` -> (`model/embedding`, 1); None for a name that is no part's."""
    match = PART_NAME.match(name)
    return (match.group("base"), int(match.group("index"))) if match else None


@dataclass(frozen=True)
class PartSlice:
    """Where one part of a TF1 partitioned variable lies in the whole tensor the Saver stored: `length` entries from
    `start` along `axis` of `full_shape`."""

    full_shape: tuple[int, ...]
    axis: int
    start: int
    length: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.length if axis == self.axis else size for axis, size in enumerate(self.full_shape))

    @property
    def spec(self) -> str:
        """The slice as a `RestoreV2` `shape_and_slices` entry, which reads only it: `"100 4 0,50:-"` is rows 0-49
        of a [100, 4] tensor."""
        extents = [f"{self.start},{self.length}" if axis == self.axis else "-" for axis in range(len(self.full_shape))]
        return " ".join(map(str, self.full_shape)) + " " + ":".join(extents)

    def of(self, whole: np.ndarray) -> np.ndarray:
        """This part of the whole value (a copy: the whole can be freed)."""
        return np.take(whole, np.arange(self.start, self.start + self.length), axis=self.axis)

    def read(self, index: CheckpointIndex, key: str) -> tf.Tensor:
        """Read just this slice of the entry `key` with TensorFlow's restore op."""
        return read_entry(index.prefix, index.role, key, tf.dtypes.as_dtype(index.dtypes[key]), self.spec)


def tile(whole: Sequence[int], parts: Mapping[int, Sequence[int]]) -> list[PartSlice] | str:
    """The slice of a saved `whole` shape each part holds, in part order, when the parts (index -> shape) tile it
    along one axis; otherwise why they do not.

    Example:
        >>> tile([100, 4], {0: [50, 4], 1: [50, 4]})[1].spec
        '100 4 50,50:-'
    """
    whole = tuple(whole)
    missing = [f"part_{index}" for index in range(max(parts, default=-1) + 1) if index not in parts]
    if missing:
        return f"{name_list(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    shapes = [tuple(parts[index]) for index in range(len(parts))]
    if not whole or any(len(shape) != len(whole) for shape in shapes):
        return f"their ranks ({', '.join(str(len(shape)) for shape in shapes)}) are not its rank, {len(whole)}"
    reasons = []
    for axis in range(len(whole)):
        if any(shape[:axis] + shape[axis + 1:] != whole[:axis] + whole[axis + 1:] for shape in shapes):
            continue
        sizes = [shape[axis] for shape in shapes]
        if sum(sizes) == whole[axis]:
            starts = itertools.accumulate(sizes[:-1], initial=0)
            return [PartSlice(whole, axis, start, size) for start, size in zip(starts, sizes)]
        reasons.append(f"along axis {axis} they add up to {sum(sizes)}, not {whole[axis]}")
    return reasons[0] if reasons else "each differs from it on more than one axis"


def parts_by_entry(variables: Sequence[RestoredVariable]) -> dict[str, dict[int, int]]:
    """The variables restored from slices of a whole entry: entry key -> part index -> position in `variables`."""
    found: dict[str, dict[int, int]] = defaultdict(dict)
    for position, variable in enumerate(variables):
        part = part_of(variable.training_name)
        if part is not None and part[0] == variable.checkpoint_key:
            found[part[0]][part[1]] = position
    return dict(found)


@dataclass(frozen=True)
class _Untiled:
    """A variable the checkpoint holds whole, and the model's parts of it that do not tile it."""

    key: str
    whole: list[int]
    base: str
    """The parts' name without `/part_<i>`, as the model names them."""
    parts: dict[int, list[int]]
    """Part index -> shape."""
    reason: str

    def received(self) -> str:
        """`model/embedding/part_0 [60, 4], part_1 [50, 4]`."""
        return f"{self.base}/" + name_list([f"part_{part} {shape}" for part, shape in sorted(self.parts.items())],
                                           limit=4)


# --- The strategy ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where one model variable's live value is in the checkpoint: an entry, or a slice of it."""

    key: str
    training_name: str
    part: PartSlice | None = None


def attribute_paths(model: Any) -> dict[int, str]:
    """Where each variable hangs in the model, by attribute and container names (`linear/kernel` for
    `self.linear.kernel`), breadth first: the path the manifest names a variable by, whatever the variable's own
    `name=` says (a `tf.Variable(name="linear/kernel")` held by the attribute `kernel` hangs at `kernel`)."""
    paths: dict[int, str] = {}
    seen = {id(model)}
    queue: list[tuple[Any, str]] = [(model, "")]
    while queue:
        obj, path = queue.pop(0)
        for name, child in children_of(obj).items():
            child_path = f"{path}/{name}".lstrip("/")
            if isinstance(child, tf.Variable) or hasattr(child, "value") and isinstance(child.value, tf.Variable):
                paths.setdefault(variable_identity(child), child_path)
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((child, child_path))
    return paths


def _sources(variables: list[Any], index: CheckpointIndex) -> tuple[dict[int, _Source], list[str], list[_Untiled]]:
    """Where each model variable's live value is (by position), every variable that has none, and every partitioned
    variable whose parts do not tile the entry it is saved whole under."""
    shapes = index.shapes
    keys = sorted(shapes)
    sources: dict[int, _Source] = {}
    problems: list[str] = []
    claimed: dict[str, str] = {}
    parts: dict[str, dict[int, int]] = defaultdict(dict)  # part name's base -> part index -> position
    for position, variable in enumerate(variables):
        names = variable_names(variable)
        key, candidates = _find_key(names, keys)
        as_part = next(filter(None, map(part_of, names)), None) if key is None and not candidates else None
        if as_part is not None:
            parts[as_part[0]][as_part[1]] = position
            continue
        if key is None:
            problems.append(f"{names[0]}: " + (f"several entries fit ({name_list(candidates)})" if candidates
                                               else "no entry of that name"))
            continue
        if key in claimed:
            problems.append(f"{names[0]} and {claimed[key]} both map to entry {key!r}")
            continue
        claimed[key] = names[0]
        if tuple(shapes[key]) != tuple(variable.shape):
            problems.append(f"{names[0]}: model shape {list(variable.shape)}, entry {key!r} has {shapes[key]}")
            continue
        sources[position] = _Source(key, key)
    untiled: list[_Untiled] = []
    for base, positions in parts.items():
        key, candidates = _find_key([base], keys)
        if key is None or key in claimed:
            why = (f"several entries fit {base} ({name_list(candidates)})" if candidates
                   else f"its parts and {claimed[key]} both map to entry {key!r}" if key
                   else f"no entry of that name, nor of {base}")
            problems += [f"{variable_names(variables[position])[0]}: {why}" for position in positions.values()]
            continue
        claimed[key] = base
        part_shapes = {part: list(variables[position].shape) for part, position in positions.items()}
        slices = tile(shapes[key], part_shapes)
        if isinstance(slices, str):
            untiled.append(_Untiled(key, list(shapes[key]), base, part_shapes, slices))
            continue
        for (part, position), part_slice in zip(sorted(positions.items()), slices):
            sources[position] = _Source(key, f"{key}/part_{part}", part_slice)
    return sources, problems, untiled


def _refusal(prefix: str, problems: list[str], untiled: list[_Untiled]) -> RestoreError:
    """The one error for every variable that cannot be restored by name."""
    if len(untiled) == 1 and not problems:
        # The common case, in one short line (the prefix's directory left out): parts that do not add up to what
        # the checkpoint holds.
        item = untiled[0]
        return RestoreError(
            f"{os.path.basename(prefix)} holds {item.key} whole, {item.whole}, which the model's parts do not tile: "
            f"{item.reason}",
            hint=f"--model must create parts that tile it along one axis, or one variable {item.key} of "
            f"{item.whole}. Received: {item.received()}")
    hint = "Name the model's variables as in training (tf.Variable(name=...), layer names)"
    if untiled:
        hint += ", partitioned ones as parts that tile the saved whole along one axis or as one whole variable"
    count = len(problems) + sum(len(item.parts) for item in untiled)
    return RestoreError(
        f"{prefix} is a name-based (TF1 Saver) checkpoint, and {count} model variables cannot be restored by name:",
        hint=hint + ", or pass the --model that wrote this checkpoint",
        problems=problems + [f"{item.key} is saved whole, {item.whole}, which the model's parts do not tile "
                             f"({item.reason}): {item.received()}" for item in untiled],
    )


def _check_restored(restored: list[RestoredVariable], sources: list[_Source], index: CheckpointIndex) -> None:
    """Every variable equals its entry (or its slice of it); each entry is read once, and one at a time."""
    by_key = sorted(zip(restored, sources), key=lambda pair: pair[1].key)
    for key, group in itertools.groupby(by_key, key=lambda pair: pair[1].key):
        whole = index.reader.get_tensor(key)
        for item, source in group:
            expected = source.part.of(whole) if source.part is not None else whole
            if not np.array_equal(np.asarray(item.variable.numpy()), expected):
                raise RestoreError(f"Variable {item.name} differs from its checkpoint entry after restoring",
                                   hint="This is a bug; please report it")


def restore_by_name(fresh: FreshModel, checkpoint: CheckpointFiles, index: CheckpointIndex) -> RestoredModel:
    """Assign every model variable the value saved under its name, or its slice of a partitioned variable saved
    whole, from the checkpoint whose `index` the read stage opened.

    Raises:
        RestoreError: Listing every variable with no entry, several candidate entries or a different shape, and
            every partitioned variable whose parts do not tile the entry it is saved whole under.
    """
    variables = fresh.variables()
    sources, problems, untiled = _sources(variables, index)
    if problems or untiled:
        raise _refusal(checkpoint.prefix, problems, untiled)
    attributes = attribute_paths(fresh.model)
    restored: list[RestoredVariable] = []
    for position, variable in enumerate(variables):
        source = sources[position]
        variable.assign(source.part.read(index, source.key) if source.part is not None
                        else index.reader.get_tensor(source.key))
        restored.append(RestoredVariable(
            variable=variable, path=attributes.get(variable_identity(variable), source.training_name),
            checkpoint_key=source.key, training_name=source.training_name, trainable=bool(variable.trainable),
            shape=tuple(variable.shape), dtype=tf.dtypes.as_dtype(variable.dtype),
            keras_path=getattr(variable, "path", "") if not isinstance(variable, tf.Variable) else "",
        ))
    _check_restored(restored, [sources[position] for position in range(len(variables))], index)
    identities = {variable_identity(item.variable) for item in restored}
    assert len(identities) == len(restored)
    return RestoredModel(fresh, checkpoint, "variable names (name-based checkpoint)", restored, index.reader)
