"""Stage 2, fresh model: build a new, untrained instance of the model and learn how to call it for serving.

The model comes from a factory (`--model package.module:factory`), or from the architecture saved beside the
checkpoint (`model.keras` or `model.json`; their weights, if any, are never used: every value is restored from the
checkpoint afterwards). The model's family (`ema_export.adapters`) says how to learn its inputs, build and call it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from ema_export.adapters import ModelAdapter, adapter_for, keras_writer_of
from ema_export.adapters.keras3 import Keras3Adapter
from ema_export.adapters.tf_keras import TfKerasAdapter
from ema_export.errors import ModelLoadError

ModelFactory = Callable[[], Any]

ARCHITECTURE_FILES = ("model.keras", "model.json")


@dataclass
class FreshModel:
    """A freshly built model and what serving needs to know about it."""

    model: Any
    factory: ModelFactory
    source: str
    input_signature: list[tf.TensorSpec]
    adapter: ModelAdapter
    """The model's family (Keras 3, tf-keras, tf.Module): how to build, call and export it."""
    input_keys: tuple[str, ...] | None = None
    """For a Keras model whose inputs are a dict (KerasHub text models): the key of each serving input, in
    signature order. The model is called with that dict, the structure it declares."""

    @property
    def is_keras(self) -> bool:
        """A Keras 3 model (the Keras-file restore and layout tell the two Keras file formats apart by it)."""
        return isinstance(self.adapter, Keras3Adapter)

    @property
    def is_tf_keras(self) -> bool:
        """A tf-keras (Keras 2) model."""
        return isinstance(self.adapter, TfKerasAdapter)

    def variables(self) -> list[Any]:
        """The model's variables, each once, in the order its family lists them (every stage uses this order)."""
        return self.adapter.variables(self.model)

    def call(self, model: Any, inputs: Sequence[tf.Tensor]) -> Any:
        """Run `model` (this one or a copy) on serving inputs, in inference mode."""
        return self.adapter.call(model, inputs, self.input_keys)

    def build(self, model: Any) -> None:
        """Create the model's variables (Keras does on the first call) so they can be restored or assigned."""
        self.adapter.build(model, self.input_signature, self.input_keys)


def load_factory(spec: str) -> ModelFactory:
    """Import `package.module:factory`; the working directory is importable, as with `python -m`."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(
            f"--model must look like package.module:factory, got {spec!r}",
            hint="Name a module and a zero-argument function or class in it, e.g. --model my_project.models:build",
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(
            f"Cannot import module {module_name!r} named by --model ({error})",
            hint="Check the spelling and that the module is on PYTHONPATH or in the current directory",
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelLoadError(
            f"Module {module_name!r} has no callable {attribute!r} (from --model {spec})",
            hint="Name a function or class that builds the model with no arguments",
        )
    return factory


_INITIALIZER_KEY = re.compile(r"(^|_)initializer$")


def _zero_initialized(node: Any) -> Any:
    """A Keras config with every initializer (`kernel_initializer`, `moving_variance_initializer`, ...) set to zeros."""
    if isinstance(node, list):
        return [_zero_initialized(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: "zeros" if _INITIALIZER_KEY.search(key) and (isinstance(value, str) or (
        isinstance(value, dict) and "class_name" in value)) else _zero_initialized(value)
            for key, value in node.items()}


def without_initial_values(config_text: str) -> str:
    """The architecture with zeros for initial values: every value is restored from the checkpoint afterwards (strictly:
    a variable left at its initial value fails the restore), so drawing random ones is wasted work.

    Random initializers dominate building a large model (about 5 s of uniform draws for 768 MB of Dense kernels on
    this project's machine against well under 1 s of zeros). Text that is not JSON is returned unchanged, for Keras
    to report.
    """
    try:
        config = json.loads(config_text)
    except ValueError:
        return config_text
    return json.dumps(_zero_initialized(config))


def _keras_config_factory(path: Path) -> ModelFactory:
    if path.suffix == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                config_text = archive.read("config.json").decode()
        except (zipfile.BadZipFile, KeyError, OSError) as error:
            raise ModelLoadError(
                f"{path} is not a readable .keras archive with a config.json ({error})",
                hint="Re-save it with model.save('model.keras'), or pass --model package.module:factory",
            ) from error
    else:
        config_text = path.read_text()

    # A .keras file tf-keras saved names tf-keras's classes (`Functional` from `keras.engine`), which Keras 3 cannot
    # rebuild: the Keras that wrote the file rebuilds it, into a model of the family its values load into.
    model_from_json = keras_writer_of(str(path)).model_from_json
    config_text = without_initial_values(config_text)

    def build() -> Any:
        try:
            return model_from_json(config_text)
        except Exception as error:  # Keras raises many types for configs it cannot rebuild
            raise ModelLoadError(
                f"Cannot rebuild the architecture in {path}: {_first_sentence(str(error))}",
                hint="Custom layers and models need their code: pass --model package.module:factory instead",
            ) from error

    return build


def _first_sentence(text: str) -> str:
    """Keras's own first sentence of an error ("Could not locate class 'Tower'"), without the whole serialized
    config it goes on to paste."""
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".")


_SPEC_PATTERN = re.compile(r"^(?P<name>[A-Za-z_][\w.\-]*):(?P<dtype>\w+):\[(?P<shape>[^\]]*)\]$")


def parse_input_signature(texts: Sequence[str]) -> list[tf.TensorSpec]:
    """Parse `NAME:DTYPE:[D0,D1,...]` (None or -1 for a dynamic dimension) into TensorSpecs."""
    specs = []
    for text in texts:
        match = _SPEC_PATTERN.match(text.replace(" ", ""))
        if not match:
            raise ModelLoadError(
                f"--input-signature must look like NAME:DTYPE:[D0,D1,...], got {text!r}",
                hint="For example --input-signature 'inputs:float32:[None,28,28,1]'",
            )
        try:
            dtype = tf.dtypes.as_dtype(match.group("dtype"))
        except TypeError as error:
            raise ModelLoadError(
                f"Unknown dtype {match.group('dtype')!r} in --input-signature {text!r}",
                hint="Use a TensorFlow dtype name such as float32, int64 or string",
            ) from error
        dims: list[int | None] = []
        for dim in filter(None, match.group("shape").split(",")):
            if dim.lower() in ("none", "-1", "?"):
                dims.append(None)
            elif dim.isdigit():
                dims.append(int(dim))
            else:
                raise ModelLoadError(
                    f"Bad dimension {dim!r} in --input-signature {text!r}",
                    hint="Dimensions are whole numbers, or None for a dynamic one",
                )
        specs.append(tf.TensorSpec(dims, dtype, name=match.group("name")))
    return specs


def _with_dynamic_batch(specs: Sequence[tf.TensorSpec], names: Sequence[str]) -> list[tf.TensorSpec]:
    result = []
    for index, spec in enumerate(specs):
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        if not shape:
            raise ModelLoadError(
                f"Input {index} has shape {spec.shape}; serving needs a known rank with a batch dimension first",
                hint="Give the full shape with --input-signature NAME:DTYPE:[None,...]",
            )
        result.append(tf.TensorSpec([None] + shape[1:], spec.dtype, name=spec.name or names[index]))
    return result


def _default_names(count: int) -> list[str]:
    return ["inputs"] if count == 1 else [f"input_{index}" for index in range(count)]


def _resolve_factory(checkpoint_dir: str | os.PathLike, model: str | ModelFactory | None,
                     training_file: str | None) -> tuple[ModelFactory, str]:
    """The factory to build the model with and how to name it: the one given, else the architecture saved in the
    training `.keras` file itself, else `model.keras` / `model.json` beside the checkpoint."""
    if isinstance(model, str):
        return load_factory(model), f"factory {model}"
    if model is not None:
        return model, f"factory {getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', model)}"
    if training_file is not None and training_file.endswith(".keras"):
        return _keras_config_factory(Path(training_file)), f"architecture of {training_file}"
    found = [Path(checkpoint_dir) / name for name in ARCHITECTURE_FILES if (Path(checkpoint_dir) / name).is_file()]
    if not found:
        raise ModelLoadError(
            f"No model given and no {' or '.join(ARCHITECTURE_FILES)} in {checkpoint_dir}",
            hint="Pass --model package.module:factory (a function returning the model, untrained)",
        )
    return _keras_config_factory(found[0]), f"architecture of {found[0]}"


def build_fresh_model(
    checkpoint_dir: str | os.PathLike,
    model: str | ModelFactory | None = None,
    input_signature: Sequence[str] | Sequence[tf.TensorSpec] | None = None,
    training_file: str | None = None,
) -> FreshModel:
    """Build a fresh model with its variables created, ready for restoring.

    Args:
        checkpoint_dir: Where to look for `model.keras` / `model.json` when `model` is not given.
        model: A factory, or `package.module:factory`.
        input_signature: Serving inputs, as TensorSpecs or `NAME:DTYPE:[shape]` strings, for models that do not
            define them.
        training_file: The training checkpoint when it is itself a `.keras` file (`model-03.keras`, whatever its
            name): its own architecture is used when `model` is not given.

    Raises:
        ModelLoadError: No model, a factory that fails, or no way to know the serving inputs.
    """
    factory, source = _resolve_factory(checkpoint_dir, model, training_file)
    try:
        instance = factory()
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"The model factory ({source}) raised {type(error).__name__}: {error}",
                             hint="Make the factory build the model with no arguments") from error

    given = [spec if isinstance(spec, tf.TensorSpec) else parse_input_signature([spec])[0]
             for spec in input_signature or []]
    adapter = adapter_for(instance)
    if adapter is None:
        raise ModelLoadError(
            f"The model from {source} is a {type(instance).__name__}; expected a Keras (3 or tf-keras) model or a "
            "tf.Module",
            hint="Return the model object itself from the factory",
        )
    declared = adapter.declared_signature(instance, source)  # a tf.Module must declare one even if inputs are given
    specs = given or declared
    if not specs:
        raise ModelLoadError(
            f"The model from {source} does not say what its inputs are (a subclassed Keras model never called)",
            hint="Pass --input-signature NAME:DTYPE:[None,...] once per input",
        )
    specs = _with_dynamic_batch(specs, _default_names(len(specs)))
    keys = adapter.input_keys(instance, specs, source)
    fresh = FreshModel(instance, factory, source, specs, adapter, keys)
    fresh.build(instance)
    return fresh


def probe_inputs(specs: Sequence[tf.TensorSpec], batch_size: int = 2, seed: int = 0) -> list[Any]:
    """Deterministic example inputs for verification and warmup (a batch size other than 1 checks the dynamic batch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape = [batch_size] + [d if d is not None else 2 for d in spec.shape.as_list()[1:]]
        if spec.dtype.is_floating:
            arrays.append(rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype))
        elif spec.dtype.is_integer:
            arrays.append(rng.integers(0, 2, size=shape).astype(spec.dtype.as_numpy_dtype))
        elif spec.dtype == tf.bool:
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            arrays.append(np.full(shape, b"", dtype=object))
    return arrays
