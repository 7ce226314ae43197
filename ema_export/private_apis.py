"""Every private TensorFlow, Keras and tf-keras interface ema-export relies on, in one place, checked by one test.

No public API does these jobs:
- Which file path Keras's saving walk gives each variable (`layers/dense/vars/0`). Reading the averages of a `.keras`
  or `.weights.h5` file needs it, and only `saving_lib._save_state` (what `save_weights` runs) knows it.
- Loading a file's values into a model while skipping its optimizer: `saving_lib.load_weights_only` (Keras 3) and
  `saving_lib._load_state` (tf-keras) take the objects to skip; `Model.load_weights` does not.
- The averages a Keras 3 optimizer built with `use_ema=True` keeps for a variable:
  `optimizer._model_variables_moving_average[optimizer._get_variable_index(variable)]`; and the whole list, in the
  order of the variables the optimizer was built on, for Keras 3 and tf-keras alike (tf-keras has no
  `_get_variable_index`): where a rebuilt optimizer puts each average among `optimizer.variables`.
- Recomputing a SavedModel's `fingerprint.pb` after `serving_default` was made an exact alias of one arm by editing
  `saved_model.pb` (see `write.alias_signature`): only TensorFlow's
  `tensorflow.python.saved_model.pywrap_saved_model.fingerprinting.CreateFingerprintDef` computes it;
  `tf.saved_model.experimental.read_fingerprint` only reads the file.

Each accessor checks the names it needs and, when a release has moved them, raises one `PrivateApiError` that
names the missing attribute and the versions this was tested with, instead of an `AttributeError` deep in a stage.
`tests/unit/test_private_apis.py` calls every accessor, so an upgrade that breaks one fails that test first.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from ema_export.errors import EmaExportError

TESTED_WITH = "tensorflow 2.16-2.21, keras 3.8-3.15 and tf-keras 2.16-2.21"
"""The releases whose private interfaces these accessors were written against (pyproject.toml bounds them)."""

_KERAS_SAVING_LIB = ("keras.src.saving.saving_lib", ("H5IOStore", "_save_state", "load_weights_only"))
_TF_KERAS_SAVING_LIB = ("tf_keras.src.saving.saving_lib", ("H5IOStore", "_save_state", "_load_state"))
_AVERAGES_LIST = "_model_variables_moving_average"
_OPTIMIZER_AVERAGES = (_AVERAGES_LIST, "_get_variable_index")
_TF_FINGERPRINTING = ("tensorflow.python.saved_model.pywrap_saved_model.fingerprinting", ("CreateFingerprintDef",))
_READS_KERAS_FILES = "ema-export reads Keras files through it"
_WRITES_FINGERPRINTS = "ema-export rewrites fingerprint.pb through it after aliasing serving_default"


class PrivateApiError(EmaExportError):
    """A private TensorFlow, Keras or tf-keras interface ema-export relies on is missing from the installed release."""


def _module_with(name: str, attributes: tuple[str, ...], purpose: str = _READS_KERAS_FILES) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise PrivateApiError(f"{name} cannot be imported ({error}); {purpose}",
                              hint=f"Install a release tested with ema-export ({TESTED_WITH})") from error
    missing = [attribute for attribute in attributes if not hasattr(module, attribute)]
    if missing:
        raise PrivateApiError(f"{name} has no {', '.join(missing)}; {purpose}",
                              hint=f"Install a release tested with ema-export ({TESTED_WITH})")
    return module


def keras_saving_lib() -> Any:
    """Keras 3's `saving_lib`, with the walk, the weights store and the loader ema-export uses."""
    return _module_with(*_KERAS_SAVING_LIB)


def tf_keras_saving_lib() -> Any:
    """tf-keras's `saving_lib`, with the walk, the weights store and the loader ema-export uses."""
    return _module_with(*_TF_KERAS_SAVING_LIB)


def optimizer_averages(optimizer: Any, variables: list[Any]) -> list[Any]:
    """The moving averages a Keras 3 `use_ema=True` optimizer keeps for `variables` (built optimizer), in order."""
    _require_attributes(optimizer, _OPTIMIZER_AVERAGES)
    averages = optimizer._model_variables_moving_average
    return [averages[optimizer._get_variable_index(variable)] for variable in variables]


def built_averages(optimizer: Any) -> list[Any]:
    """Every average a built `use_ema=True` optimizer (Keras 3 or tf-keras) keeps, in the order of the variables it
    was built on (`optimizer.build(variables)`)."""
    _require_attributes(optimizer, (_AVERAGES_LIST,))
    return list(getattr(optimizer, _AVERAGES_LIST) or [])


def _require_attributes(optimizer: Any, attributes: tuple[str, ...]) -> None:
    missing = [attribute for attribute in attributes if not hasattr(optimizer, attribute)]
    if missing:
        raise PrivateApiError(f"{type(optimizer).__name__} has no {', '.join(missing)}; ema-export reads the "
                              "optimizer's averages through them",
                              hint=f"Install a Keras release tested with ema-export ({TESTED_WITH})")


def fresh_fingerprint(directory: Path) -> bytes:
    """The serialized `FingerprintDef` of the SavedModel in `directory`, computed afresh from the files there.

    It is what `tf.saved_model.save` writes to `fingerprint.pb` (checksums of saved_model.pb, of its graph, signatures
    and object graph, and of the variables), through the same TensorFlow function.
    """
    name, attributes = _TF_FINGERPRINTING
    fingerprinting = _module_with(name, attributes, _WRITES_FINGERPRINTS)
    try:
        return bytes(fingerprinting.CreateFingerprintDef(str(directory)))
    except TypeError as error:  # pybind11 raises TypeError when the arguments no longer match the binding
        raise PrivateApiError(f"{name}.CreateFingerprintDef no longer takes (export_dir) ({error}); "
                              f"{_WRITES_FINGERPRINTS}",
                              hint=f"Install a release tested with ema-export ({TESTED_WITH})") from error
