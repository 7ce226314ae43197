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
- Writing a SavedModel's graph before its variables (`SavedModelInParts`): `tf.saved_model.save` does both in one call
  (tensorflow/python/saved_model/save.py, `save_and_return_nodes`: MetaGraph, then variables, then saved_model.pb).
  Its parts are `save._build_meta_graph` (the MetaGraph and the object saver that writes the variables),
  `builder_impl.copy_assets_to_destination_dir` and `fingerprinting_utils.write_fingerprint`.
- Writing those variables other than through the saver (`SavedModelInParts.saved_tensors`, for `bundle.write_bundle`):
  only `TrackableSaver._gather_serialized_tensors` lists what the saver writes, with the object graph, and only
  `saveable_object.SaveSpec` tells a value read when saved from a tensor.
- Whether an object of a model saves values other than variables (a lookup table, Python state): only its overriding
  `Trackable._serialize_to_tensors` or `_gather_saveables_for_checkpoint` tells (`saves_state_of_its_own`), which is
  what `tf.train.Checkpoint` itself asks (tensorflow/python/training/saving/saveable_object_util.py,
  `trackable_has_serialize_to_tensor`, at 2.21). The restore stage reads a model made of variables only in parallel.
- Loading a SavedModel in TF Serving's steps with the graph ready before the variables exist: `loader_impl`'s
  `SavedModelLoader`, `get_init_op` and `get_asset_tensors` (what `tf.compat.v1.saved_model.load` runs: import,
  restore, init op), and
  `Session._make_callable_from_options`, which builds a run's executor (pruning, Grappler) when asked rather than on
  the first run.

Each accessor checks the names it needs and, when a release has moved them, raises one `PrivateApiError` that
names the missing attribute and the versions this was tested with, instead of an `AttributeError` deep in a stage.
`tests/unit/test_private_apis.py` calls every accessor, so an upgrade that breaks one fails that test first.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ema_export.errors import EmaExportError, naming_the_file

TESTED_WITH = "tensorflow 2.16-2.21, keras 3.8-3.15 and tf-keras 2.16-2.21"
"""The releases whose private interfaces these accessors were written against (pyproject.toml bounds them)."""

_KERAS_SAVING_LIB = ("keras.src.saving.saving_lib", ("H5IOStore", "_save_state", "load_weights_only"))
_TF_KERAS_SAVING_LIB = ("tf_keras.src.saving.saving_lib", ("H5IOStore", "_save_state", "_load_state"))
_AVERAGES_LIST = "_model_variables_moving_average"
_OPTIMIZER_AVERAGES = (_AVERAGES_LIST, "_get_variable_index")
_TF_FINGERPRINTING = ("tensorflow.python.saved_model.pywrap_saved_model.fingerprinting", ("CreateFingerprintDef",))
_TF_SAVE = ("tensorflow.python.saved_model.save", ("_build_meta_graph",))
_TF_ASSETS = ("tensorflow.python.saved_model.builder_impl", ("copy_assets_to_destination_dir",))
_TF_FINGERPRINT_WRITER = ("tensorflow.python.saved_model.fingerprinting_utils", ("write_fingerprint",))
_TF_SAVE_SPEC = ("tensorflow.python.training.saving.saveable_object", ("SaveSpec",))
_TF_LOADER = ("tensorflow.python.saved_model.loader_impl", ("SavedModelLoader", "get_init_op", "get_asset_tensors"))
_SESSION_CALLABLE = "_make_callable_from_options"
_SERIALIZED_TENSORS = "_gather_serialized_tensors"
_READS_KERAS_FILES = "ema-export reads Keras files through it"
_READS_AVERAGES = "ema-export reads the optimizer's averages through them"
_WRITES_IN_PARTS = "ema-export writes a SavedModel's graph before its variables through it"
_LOADS_IN_STEPS = "ema-export verifies an export by loading it in TF Serving's steps through it"
_WRITES_FINGERPRINTS = "ema-export rewrites fingerprint.pb through it after aliasing serving_default"


class SavedTensor(NamedTuple):
    """One tensor a checkpoint saves: its key, its slice spec ("" for a whole tensor) and its value (eager)."""

    key: str
    slice_spec: str
    tensor: Any


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


def _require_attributes(obj: Any, attributes: tuple[str, ...], purpose: str = _READS_AVERAGES,
                        release: str = "a Keras release") -> None:
    missing = [attribute for attribute in attributes if not hasattr(obj, attribute)]
    if missing:
        raise PrivateApiError(f"{type(obj).__name__} has no {', '.join(missing)}; {purpose}",
                              hint=f"Install {release} tested with ema-export ({TESTED_WITH})")


def saves_state_of_its_own(obj: Any) -> bool:
    """Whether `tf.train.Checkpoint` would save or restore values of `obj` itself (not of its children): a lookup
    table, a Python state, a variable. Unknown objects count as saving state, so a caller never skips them."""
    import tensorflow as tf

    trackable = tf.__internal__.tracking.Trackable
    if not isinstance(obj, trackable):
        return False
    try:
        return (type(obj)._serialize_to_tensors is not trackable._serialize_to_tensors
                or bool(obj._gather_saveables_for_checkpoint()))
    except Exception:  # noqa: BLE001 - whatever a release changed, the answer that skips nothing
        return True


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


class SavedModelInParts:
    """What `tf.saved_model.save(root, directory, signatures)` writes, in the order an export needs it.

    `tf.saved_model.save` builds the MetaGraph, writes the variables, then `saved_model.pb` and `fingerprint.pb`
    (tensorflow/python/saved_model/save.py, `save_and_return_nodes`, lines 1466-1503 at 2.21). Here the MetaGraph is
    built on construction and left in `saved_model` to be edited, `write_graph` writes it (and the assets) and
    `write_variables` writes the variables and the fingerprint. The files are those `tf.saved_model.save` writes, with
    the same saver; only their order differs, and the variables may be split into shards written at once.
    """

    def __init__(self, root: Any, signatures: Any) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        save = _module_with(*_TF_SAVE, _WRITES_IN_PARTS)
        self._assets_module = _module_with(*_TF_ASSETS, _WRITES_IN_PARTS)
        self._fingerprints = _module_with(*_TF_FINGERPRINT_WRITER, _WRITES_IN_PARTS)
        # 1 is save.py's constants.SAVED_MODEL_SCHEMA_VERSION, which tensorflow exports under no public name
        self.saved_model = saved_model_pb2.SavedModel(saved_model_schema_version=1)
        built = save._build_meta_graph(root, signatures, tf.saved_model.SaveOptions(),
                                       self.saved_model.meta_graphs.add())
        try:
            _, self._exported_graph, self._saver, assets, _, _ = built
            self._asset_files = assets.asset_filename_map
        except (TypeError, ValueError, AttributeError) as error:
            raise PrivateApiError(f"{_TF_SAVE[0]}._build_meta_graph no longer returns (meta_graph_def, graph, saver, "
                                  f"asset_info, nodes, paths) ({error}); {_WRITES_IN_PARTS}",
                                  hint=f"Install a release tested with ema-export ({TESTED_WITH})") from error

    def write_graph(self, directory: Path) -> None:
        """Write the assets and `saved_model.pb` (as it stands in `saved_model`) into `directory`."""
        import tensorflow as tf

        self._assets_module.copy_assets_to_destination_dir(self._asset_files, str(directory))
        path = directory / tf.saved_model.SAVED_MODEL_FILENAME_PB
        with naming_the_file(path):
            path.write_bytes(self.saved_model.SerializeToString(deterministic=True))

    def write_variables(self, directory: Path, writer: Callable[[str, list[SavedTensor]], None] | None = None
                        ) -> None:
        """Write the variables (`variables/variables.*`), then `fingerprint.pb` (which checksums them too).

        Without `writer` the saver writes them, as `tf.saved_model.save` runs it: eagerly, one `SaveV2` per shard.
        With one, `writer(prefix, tensors)` is given what that saver would write (`saved_tensors`) and must leave the
        checkpoint `prefix`; when a release moved what `saved_tensors` reads, or the model has a saver registered
        for its own objects, the saver writes them after all.
        """
        import tensorflow as tf

        prefix = str(directory / tf.saved_model.VARIABLES_DIRECTORY / tf.saved_model.VARIABLES_FILENAME)
        (directory / tf.saved_model.VARIABLES_DIRECTORY).mkdir(exist_ok=True)
        tensors = None
        if writer is not None:
            with contextlib.suppress(PrivateApiError):
                tensors = self.saved_tensors()
        if writer is None or tensors is None:
            self._saver.save(prefix)
        else:
            writer(prefix, tensors)
        self._fingerprints.write_fingerprint(str(directory))
        # save.py keeps the exported graph (and the constants it captured) until the variables are written
        self._exported_graph = None

    def saved_tensors(self) -> list[SavedTensor]:
        """What the object saver writes into the checkpoint, eagerly: each (checkpoint key, slice spec, tensor), the
        object graph (a string scalar under `_CHECKPOINTABLE_OBJECT_GRAPH`) included.

        It is what `TrackableSaver.save` hands `functional_saver.MultiDeviceSaver`
        (tensorflow/python/checkpoint/checkpoint.py, `_gather_serialized_tensors` and
        `_save_cached_when_graph_building`, at 2.21), each `SaveSpec` read as that saver reads it: a variable by
        `read_value_no_copy`, its own buffer (resource_variable_ops.py, `_serialize_to_tensors`).

        Raises:
            PrivateApiError: The saver has no `_gather_serialized_tensors`, or the model registers a saver of its own
                (`registration.register_checkpoint_saver`), which only TensorFlow's saver knows how to run.
        """
        save_spec = _module_with(*_TF_SAVE_SPEC, _WRITES_IN_PARTS).SaveSpec
        _require_attributes(self._saver, (_SERIALIZED_TENSORS,), _WRITES_IN_PARTS, release="a release")
        serialized, _, registered, _ = getattr(self._saver, _SERIALIZED_TENSORS)()
        if registered:
            raise PrivateApiError(f"the model registers savers of its own ({', '.join(registered)}); "
                                  f"{_WRITES_IN_PARTS}", hint="TensorFlow's saver writes it")
        saved = []
        for tensor_dict in serialized.values():
            for key, slices in tensor_dict.items():
                for spec, value in (slices if isinstance(slices, dict) else {"": slices}).items():
                    tensor = value.tensor if isinstance(value, save_spec) else value
                    if tensor is not None:  # None: recorded in the object graph, no value saved
                        saved.append(SavedTensor(key, spec.strip() if isinstance(spec, str) else spec, tensor))
        return saved


def tf1_loader() -> Any:
    """TensorFlow's `loader_impl`: `SavedModelLoader` (`tf.compat.v1.saved_model.load`'s steps, callable one by one),
    `get_init_op` and `get_asset_tensors` (the init op it runs after restoring, and that op's asset feeds)."""
    return _module_with(*_TF_LOADER, _LOADS_IN_STEPS)


def session_callable(session: Any, feeds: list[str], fetches: list[str], targets: list[str]) -> Any:
    """A callable running `session` with these feeds, fetches and targets, its executor built now.

    `Session.make_callable` with feeds builds nothing until the first call; `_make_callable_from_options` builds the
    pruned, Grappler-optimized graph at once (the same graph the first `Session.run` with these names would build).
    """
    from tensorflow.core.protobuf import config_pb2

    _require_attributes(session, (_SESSION_CALLABLE,), _LOADS_IN_STEPS, release="a release")
    options = config_pb2.CallableOptions(feed=feeds, fetch=fetches, target=targets)
    return getattr(session, _SESSION_CALLABLE)(options)
