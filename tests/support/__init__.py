"""The one home of what the tests share: models with known weights, checkpoint producers, served exports, request
builders, a scripted fake server, a server child process and the fidelity-table registry.

Importable as ``support`` because pyproject's pytest ``pythonpath`` is ``tests``. The modules that define fixtures
are registered once, as plugins, in ``tests/conftest.py``; test modules import helpers from them by name.

* `models`: tiny models with known weights and real checkpoints of them (the seed `LinearModule`, a Keras MLP).
* `graph_model`: a TF1 SavedModel written by TensorFlow's own builder, for what ema-export never writes.
* `producers`: real EMA checkpoints from training code (Keras ``use_ema``, optimizer-slot wrappers).
* `served`: the seed model exported once per session (versions 1 and 2), the servers that serve it, expected values.
* `rpc`: inputs and PredictRequests for the seed model, the official stubs on a loopback channel.
* `fake_server`: a PredictionService scripted per test (failures, delays) and a self-signed certificate.
* `serving_process`: ``ema-serving serve`` in a child process, for RSS and signals.
* `fidelity`: the registry behind README's fidelity table (``python tests/support/fidelity.py`` rewrites it).
"""
