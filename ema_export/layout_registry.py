"""The checkpoint layouts, named once, in the order auto-detection tries them; importing this needs no TensorFlow.

The command line's `--help` lists these names without importing the layouts themselves (which import TensorFlow),
and `ema_export.layouts` imports each class from here. Adding a layout means adding its module and one line here.
The explicit layouts (a separate EMA checkpoint) come before the ones inferred from names inside the training
checkpoint.
"""

from __future__ import annotations

LAYOUT_CLASSES: tuple[tuple[str, str], ...] = (
    ("ema-checkpoint", "ema_export.layouts.ema_checkpoint:EmaCheckpointLayout"),
    ("tracked-shadows", "ema_export.layouts.tracked:TrackedShadowsLayout"),
    ("keras-use-ema", "ema_export.layouts.keras_optimizer:KerasOptimizerEmaLayout"),
    ("tf-keras-use-ema", "ema_export.layouts.keras_optimizer:TfKerasOptimizerEmaLayout"),
    ("keras-file-use-ema", "ema_export.layouts.keras_file:KerasFileEmaLayout"),
    ("optimizer-slot", "ema_export.layouts.optimizer_slot:OptimizerSlotLayout"),
    ("tf1-names", "ema_export.layouts.tf1_names:Tf1NamesLayout"),
)
"""(layout name, "module:Class") pairs, in detection order."""

LAYOUT_NAMES: tuple[str, ...] = tuple(name for name, _ in LAYOUT_CLASSES)
"""Every layout name `--layout` accepts, in detection order."""
