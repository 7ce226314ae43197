"""The one interface every checkpoint layout implements, and the name matching they share.

A layout answers one question: given the checkpoint indexes and the restored model, which shadow value belongs to
each model variable, and which variables have none? It only finds and pairs; `fold` validates and decides. The read
stage opens the checkpoints and hands every layout the same `CheckpointIndexes`, so no layout opens a file of its own.
"""

from __future__ import annotations

import abc
import functools
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import tensorflow as tf

from ema_export.errors import name_list
from ema_export.read import ROLE_EMA, CheckpointIndex, CheckpointIndexes, read_entry
from ema_export.restored import RestoredModel

EMA_SUFFIX = re.compile(r"/ExponentialMovingAverage(_\d+)?$")
"""How `tf.train.ExponentialMovingAverage` names a shadow: `<variable>/ExponentialMovingAverage[_N]`."""


@dataclass(frozen=True)
class Shadow:
    """One averaged value in a checkpoint, and the training-time variable names it may belong to."""

    checkpoint_key: str
    recorded_name: str
    claimed_names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: tf.DType
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)
    prefix: str | None = None
    """The TensorFlow checkpoint holding the value under `checkpoint_key`, when it is one (None: only `read`)."""
    role: str = ROLE_EMA
    """Which half of the export the checkpoint at `prefix` is, for the message when reading it fails."""
    slice_spec: str = ""
    """The part of the entry at `prefix` this shadow is, as a `RestoreV2` `shape_and_slices` entry ("100 4 0,50:-"),
    for a part of a TF1 partitioned variable saved whole; "" for the whole entry. `shape` and `read` are the part's."""

    def value(self) -> np.ndarray:
        """Read the value from its file (only folding does, once, so large checkpoints are not held twice)."""
        return np.asarray(self.read())

    def tensor(self) -> tf.Tensor:
        """Read the value as a TensorFlow tensor, once.

        From a TensorFlow checkpoint it is read by TensorFlow's own restore op into memory TensorFlow owns, so a
        variable created from the tensor adopts that memory instead of copying it (TensorFlow's AssignVariableOp
        forwards an input buffer nothing else references); the checks read it through a numpy view of the same
        memory. Other shadows (Keras files, held copies) are read into numpy and converted.
        """
        if self.prefix is None:
            return tf.convert_to_tensor(self.value())
        return read_entry(self.prefix, self.role, self.checkpoint_key, self.dtype, self.slice_spec)


@dataclass
class ShadowMatch:
    """A layout's answer: shadow per variable (by index into `RestoredModel.variables`), leftovers and problems."""

    layout: str
    source: str
    matched: dict[int, Shadow]
    unmatched: list[Shadow]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    explains_equality: bool = False
    """The layout's warnings already explain why the shadows equal the live values (e.g. Keras `fit()` finalizing)."""
    shared_names: tuple[str, ...] = ()
    """Names several model variables share, claimed by shadows that could therefore not be paired (a problem each)."""


@dataclass(frozen=True)
class LayoutSettings:
    """What a user can tell a layout that the checkpoint cannot.

    Attributes:
        ema_name: The `name=` a TF1 `ExponentialMovingAverage` was given (its shadows are `<var>/<ema_name>`).
        inverted: The checkpoint's model holds the averages and its EMA values the raw weights (True: swap the arms
            back), or it does not (False); None lets the evidence decide and refuses when it is ambiguous.
        bn_stats: `--bn-stats`, so a layout only warns about averaged statistics that will not be served.
    """

    ema_name: str | None = None
    inverted: bool | None = None
    bn_stats: str = "live"


class CheckpointShadows:
    """Builds shadows from the entries of one TensorFlow checkpoint, through its index (shape and dtype maps read
    once, by the read stage).

    Every layout that reads a checkpoint makes its shadows here. Each shadow knows its checkpoint's prefix and role,
    so folding reads it through TensorFlow's restore op and a failed read names the checkpoint.
    """

    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index

    def shadow(self, checkpoint_key: str, recorded_name: str, claimed: Sequence[str | None]) -> Shadow:
        """The shadow stored under `checkpoint_key`, claiming the given names (blanks dropped, order kept)."""
        return Shadow(
            checkpoint_key=checkpoint_key,
            recorded_name=recorded_name,
            claimed_names=tuple(dict.fromkeys(name for name in claimed if name)),
            shape=tuple(self.index.shapes[checkpoint_key]),
            dtype=tf.dtypes.as_dtype(self.index.dtypes[checkpoint_key]),
            read=functools.partial(self.index.reader.get_tensor, checkpoint_key),
            prefix=self.index.prefix,
            role=self.index.role,
        )


class Layout(abc.ABC):
    """A way training code stores EMA shadows.

    A layout is given what the read stage opened (`CheckpointIndexes`: the training index or Keras file, the EMA
    index if any) and the restored model, and looks only there. Adding one means a module with a subclass and a line
    in `ema_export.layout_registry`.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, settings: LayoutSettings | None = None) -> None:
        self.settings = settings or LayoutSettings()

    @abc.abstractmethod
    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        """Why this layout applies to these checkpoints, or None when it does not."""

    @abc.abstractmethod
    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        """Pair every shadow the layout finds with a model variable."""


def strip_ema_suffix(name: str) -> str | None:
    """`dense/kernel/ExponentialMovingAverage_1` -> `dense/kernel`; None when the name has no EMA suffix."""
    stripped = EMA_SUFFIX.sub("", name)
    return stripped if stripped != name else None


def strip_output_index(name: str) -> str:
    """`weights:0` -> `weights`: dict keys built from `v.name` carry the tensor's output index."""
    return re.sub(r":\d+$", "", name)


def match_by_name(layout: str, source: str, shadows: Sequence[Shadow], restored: RestoredModel) -> ShadowMatch:
    """Pair shadows with variables by the variables' training-time names.

    A variable answers to its training-time name and, for Keras, its path. A shadow's claimed names are tried in
    order; the first that names exactly one variable wins. When none does and one names several variables (two
    variables saved under one name), that is a duplicate claim and is reported, never guessed.
    """
    by_name: dict[str, list[int]] = defaultdict(list)
    by_short_name: defaultdict[str, list[int]] = defaultdict(list)
    for index, variable in enumerate(restored.variables):
        for alias in variable.aliases:
            by_name[alias].append(index)
        by_short_name[variable.training_name.rsplit("/", 1)[-1]].append(index)

    matched: dict[int, Shadow] = {}
    unmatched: list[Shadow] = []
    problems: list[str] = []
    shared: dict[str, tuple[list[int], list[str]]] = {}  # a name several variables share -> (them, its shadows)
    for shadow in shadows:
        owner: int | None = None
        ambiguous: tuple[str, list[int]] | None = None
        for claimed in shadow.claimed_names:
            owners = sorted(set(by_name.get(claimed, [])))
            if len(owners) == 1:
                owner = owners[0]
                break
            if owners and ambiguous is None:
                ambiguous = (claimed, owners)
        if owner is None and ambiguous is not None:
            claimed, owners = ambiguous
            shared.setdefault(claimed, (owners, []))[1].append(shadow.checkpoint_key)
            continue
        # Dict keys built from Keras 3 `v.name` ("kernel") name a layer's variable but not which layer: the dict
        # kept one shadow per short name and silently lost the others when training saved it.
        short = [name for name in shadow.claimed_names if name not in by_name and len(by_short_name[name]) > 1]
        if short:
            owners = by_short_name[short[0]]
            shared.setdefault(short[0], ([], []))
            problems.append(
                f"duplicate claim: shadow {shadow.checkpoint_key} is keyed {short[0]!r}, the short name of "
                f"{len(owners)} variables ({name_list([restored.variables[i].training_name for i in owners])}); "
                "key the EMA dict by v.path (Keras) or v.name (tf.Variable), which are unique"
            )
            continue
        if owner is None:
            unmatched.append(shadow)
            continue
        if owner in matched:
            problems.append(
                f"duplicate claim: shadows {matched[owner].checkpoint_key} and {shadow.checkpoint_key} both belong to "
                f"{restored.variables[owner].name}"
            )
            continue
        matched[owner] = shadow
    for claimed, (owners, keys) in shared.items():  # one problem per shared name, however many shadows claim it
        if not keys:
            continue  # a short name, reported where it was found
        what = f"shadow {keys[0]} is" if len(keys) == 1 else f"{len(keys)} shadows ({name_list(keys, 3)}) are"
        problems.append(f"duplicate claim: {what} named {claimed!r}, the name of {len(owners)} variables "
                        f"({name_list([restored.variables[i].path for i in owners])})")
    return ShadowMatch(layout, source, matched, unmatched, problems, shared_names=tuple(shared))
