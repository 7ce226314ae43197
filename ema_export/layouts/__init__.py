"""Checkpoint layouts: one strategy per way training code stores EMA shadows, and auto-detection among them.

Adding a layout means adding a module with a `Layout` subclass and naming it in `ema_export.layout_registry`; no
other stage changes. Auto-detection tries them in the registry's order. Every layout is given the `CheckpointIndexes`
the read stage opened and the restored model, nothing else.
"""

from __future__ import annotations

import importlib

from ema_export.errors import LayoutError
from ema_export.layout_registry import LAYOUT_CLASSES
from ema_export.layouts.base import Layout, LayoutSettings, Shadow, ShadowMatch
from ema_export.read import CheckpointIndexes
from ema_export.restored import RestoredModel


def _load_layouts() -> dict[str, type[Layout]]:
    """Import every registered layout. A layout that fails to import fails loudly: skipping it would silently change
    what auto-detection tries."""
    layouts: dict[str, type[Layout]] = {}
    for name, spec in LAYOUT_CLASSES:
        module_name, _, class_name = spec.partition(":")
        layout = getattr(importlib.import_module(module_name), class_name)
        if layout.name != name:
            raise ImportError(f"{spec} calls itself {layout.name!r} but is registered as {name!r} in "
                              "ema_export.layout_registry")
        layouts[name] = layout
    return layouts


LAYOUTS: dict[str, type[Layout]] = _load_layouts()
"""Every known layout by name, in the order auto-detection tries them."""


def choose_layout(indexes: CheckpointIndexes, restored: RestoredModel, name: str | None = None,
                  settings: LayoutSettings | None = None) -> tuple[Layout, str]:
    """The layout to read shadows with, and why it was chosen.

    Args:
        indexes: What the read stage opened (`read.read_checkpoints`).
        restored: The restored model.
        name: The layout given with `--layout`; None detects it.
        settings: What the user said about the checkpoint (`--ema-name`, `--inverted`, `--bn-stats`).

    Raises:
        LayoutError: `name` is unknown, a checkpoint is an inverted EMA checkpoint (the model holds the averages),
            or no layout finds shadows (the message names every layout tried).
    """
    layout, reason = _choose(indexes, restored, name, settings or LayoutSettings())
    if settings is not None and settings.inverted:
        return _SwappedBack(layout), reason + "; arms swapped back (--inverted)"
    return layout, reason


class _SwappedBack(Layout):
    """A layout read the other way round: for an inverted checkpoint, declared with `--inverted`."""

    def __init__(self, inner: Layout) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.description = inner.description  # type: ignore[misc]

    def detect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> str | None:
        return self.inner.detect(indexes, restored)

    def collect(self, indexes: CheckpointIndexes, restored: RestoredModel) -> ShadowMatch:
        from ema_export.layouts.inversion import swap_arms

        return swap_arms(self.inner.collect(indexes, restored), restored)


def _choose(indexes: CheckpointIndexes, restored: RestoredModel, name: str | None,
            settings: LayoutSettings) -> tuple[Layout, str]:
    from ema_export.layouts.optimizer_slot import find_inversion, refuse_inverted

    # An inverted checkpoint has the keys of a regular one, so any layout would misread it: refuse it first, unless
    # the user said what it is.
    for index in (indexes.training, indexes.ema) if settings.inverted is None else ():
        inversion = find_inversion(index.prefix, indexes) if index is not None else None
        if inversion is not None:
            raise refuse_inverted(inversion, given_as_ema=index is indexes.ema)
    if name is not None:
        if name not in LAYOUTS:
            raise LayoutError(
                f"Unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}",
                hint="Omit --layout to detect it, or pick one of those names",
            )
        layout = LAYOUTS[name](settings)
        return layout, f"chosen with --layout ({layout.detect(indexes, restored) or 'not detected'})"
    for layout_class in LAYOUTS.values():
        layout = layout_class(settings)
        reason = layout.detect(indexes, restored)
        if reason:
            return layout, reason
    cause = _likely_cause(indexes)
    if cause:
        raise LayoutError(f"No EMA shadows in {indexes.training_source}: {cause}",
                          hint="Train with use_ema=True on the optimizer (or keep an EMA yourself and save it with "
                          "ema_export.training), then export that checkpoint")
    tried = "; ".join(f"{n} ({cls.description})" for n, cls in LAYOUTS.items())
    raise LayoutError(
        f"No EMA shadows found for {indexes.training_source}. Layouts tried: {tried}",
        hint="Pass --ema-checkpoint PATH if the shadows were saved elsewhere, or --layout NAME to force one",
    )


def _likely_cause(indexes: CheckpointIndexes) -> str | None:
    """Why a checkpoint has no averages, when the file itself says so: a `.keras` file whose optimizer was
    configured without `use_ema` (its config.json records the compile arguments)."""
    from ema_export.keras_files import optimizer_config

    if indexes.ema is not None or indexes.keras_file is None or not indexes.keras_file.endswith(".keras"):
        return None
    config = optimizer_config(indexes.keras_file)
    if config is None:
        return "the model in it was saved without a compiled optimizer, so it holds no optimizer averages"
    inner = (config.get("config") or {}).get("inner_optimizer") or config  # LossScaleOptimizer wraps the real one
    settings = inner.get("config") or {}
    if not settings.get("use_ema"):
        return (f"its optimizer config says {inner.get('class_name', 'the optimizer')} use_ema="
                f"{settings.get('use_ema', False)}, so training kept no moving averages")
    return None


__all__ = ["LAYOUTS", "Layout", "LayoutSettings", "Shadow", "ShadowMatch", "choose_layout"]
