"""Checkpoint layouts: one strategy per way training code stores EMA shadows, and auto-detection among them.

Adding a layout means adding a module with a `Layout` subclass and listing it in `LAYOUTS`; no other stage changes.
"""

from __future__ import annotations

from ema_export.errors import LayoutError
from ema_export.layouts.base import Layout, Shadow, ShadowMatch
from ema_export.layouts.ema_checkpoint import EmaCheckpointLayout
from ema_export.locate import CheckpointSources
from ema_export.restore import RestoredModel

LAYOUTS: dict[str, type[Layout]] = {layout.name: layout for layout in (EmaCheckpointLayout,)}
"""Every known layout by name, in the order auto-detection tries them."""


def choose_layout(sources: CheckpointSources, restored: RestoredModel, name: str | None = None) -> tuple[Layout, str]:
    """The layout to read shadows with, and why it was chosen.

    Raises:
        LayoutError: `name` is unknown, or no layout finds shadows (the message names every layout tried).
    """
    if name is not None:
        if name not in LAYOUTS:
            raise LayoutError(
                f"Unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}",
                hint="Omit --layout to detect it, or pick one of those names",
            )
        layout = LAYOUTS[name]()
        return layout, f"chosen with --layout ({layout.detect(sources, restored) or 'not detected'})"
    for layout_class in LAYOUTS.values():
        layout = layout_class()
        reason = layout.detect(sources, restored)
        if reason:
            return layout, reason
    tried = "; ".join(f"{n}: {cls.description}" for n, cls in LAYOUTS.items())
    raise LayoutError(
        f"No EMA shadows found for {sources.training.prefix}. Layouts tried: {tried}",
        hint="Pass --ema-checkpoint PATH if the shadows were saved elsewhere",
    )


__all__ = ["LAYOUTS", "Layout", "Shadow", "ShadowMatch", "choose_layout"]
