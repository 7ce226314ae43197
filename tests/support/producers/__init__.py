"""Real producers of EMA checkpoints, one module per kind of training code: `keras_ema` (Keras optimizers with
``use_ema``, ``.keras``/HDF5 files) and `optimizer_slot` (averages kept in optimizer slots)."""
