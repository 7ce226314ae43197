"""The contracts the exporter, the local server, the client and TF Serving itself share, defined once.

Signature and output names, file names inside an export, default ports, the error base class and TF Serving's rule
for which children of a base path are versions. Both packages import them from here and never spell them again.
This module imports only the standard library: the TensorFlow-free client loads it, and a test checks that importing
it does not import TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

# --- Signatures and outputs -------------------------------------------------------------------------------------

SIGNATURE_LIVE: Final = "serve_live"
"""Signature that computes with the raw (live) training weights."""

SIGNATURE_EMA: Final = "serve_ema"
"""Signature that computes with the exponential-moving-average (shadow) weights."""

SIGNATURE_DEFAULT: Final = "serving_default"
"""TF Serving's default signature key; an alias of one of the two arms (EMA unless told otherwise)."""

ARM_SIGNATURES: Final = (SIGNATURE_LIVE, SIGNATURE_EMA)
"""The two arms of an A/B comparison, in a fixed order."""

DEFAULT_ARMS: Final[Mapping[str, str]] = MappingProxyType({"ema": SIGNATURE_EMA, "live": SIGNATURE_LIVE})
"""`--default-signature` choices and the signature `serving_default` aliases for each (read-only)."""

OUTPUT_NAME_PREFIX: Final = "output_"
"""A model that returns a tensor or a list names its signature outputs `output_0`, `output_1`, ... (dict keys as
given otherwise); clients look results up by these names."""


def output_name(index: int) -> str:
    """The signature output name of a model's `index`-th unnamed output: `output_name(0) == "output_0"`."""
    return f"{OUTPUT_NAME_PREFIX}{index}"


# --- Files inside an export -------------------------------------------------------------------------------------

ASSETS_EXTRA_DIR: Final = "assets.extra"
"""Folder of a SavedModel version that TF Serving reads warmup data from and otherwise leaves alone."""

MANIFEST_FILENAME: Final = "ema_export.json"
"""JSON manifest of an export, written to ``<version>/assets.extra/``."""

WARMUP_FILENAME: Final = "tf_serving_warmup_requests"
"""TF Serving's warmup file: a TFRecord of PredictionLog records, at most 1000."""

EMA_CHECKPOINT_SUBDIR: Final = "ema"
"""Where the EMA checkpoint lives inside a training checkpoint directory, by convention."""

TEMP_VERSION_PREFIX: Final = "temp-ema-export-"
"""Prefix of the non-numeric directory an export is written under before it is renamed to its version number."""

# --- Serving defaults -------------------------------------------------------------------------------------------

DEFAULT_GRPC_PORT: Final = 8500
"""TF Serving's default gRPC port."""

DEFAULT_REST_PORT: Final = 8501
"""The REST port TF Serving's Docker image uses (the binary's own default is 0, off)."""

DEFAULT_MODEL_NAME: Final = "model"
"""Model name used when none is given (TF Serving's Docker image uses the same)."""

# --- Errors -----------------------------------------------------------------------------------------------------


SUMMARY_CHARACTERS: Final = 300
"""How long a one-line error may get on a terminal before `HintedError.summary` shortens it."""
_MORE_IN_FULL: Final = " (all of it: --verbose)"


class HintedError(ValueError):
    """An error that says what happened, how to fix it, and every offender; the base of the project's errors.

    Args:
        message: What happened and what was expected.
        hint: How to fix it, usually naming a flag.
        problems: Every individual offender, when one error reports many (validation runs fully, then raises once).
    """

    def __init__(self, message: str, hint: str = "", problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems = list(problems)

    def __str__(self) -> str:
        text = self.message
        if self.problems:
            text += " " + "; ".join(self.problems)
        if self.hint:
            text = text.rstrip(".") + f". {self.hint}"
        return text

    def summary(self, limit: int = SUMMARY_CHARACTERS) -> str:
        """The error in about `limit` characters, for a terminal line: the message whole (our own words and the
        paths they name), as many problems as fit (the first one always, up to 80 characters), the count of the rest,
        and the hint, its "Received: ..." list cut to fit. What is cut stays in `str(error)`, which `--verbose` and
        `--json` show whole; text quoted from other libraries is shortened where it is quoted.
        """
        whole = str(self)
        if len(whole) <= limit:
            return whole
        fix, _, received = self.hint.partition("Received:")
        fix = fix.strip().rstrip(".")
        budget = limit - len(self.message) - len(fix) - len(_MORE_IN_FULL) - 4
        shown: list[str] = []
        for problem in self.problems:
            clipped = _clip(problem, 120 if shown else max(budget - len(" and 999 more"), 80))
            if shown and len("; ".join(shown + [clipped])) + len(" and 999 more") > budget:
                break
            shown.append(clipped)
        text = self.message
        if self.problems:
            rest = len(self.problems) - len(shown)
            text += " " + "; ".join(shown) + (f"{' and' if shown else ''} {rest} more" if rest else "")
        received = received.strip()
        room = limit - len(text) - len(fix) - len(_MORE_IN_FULL) - 14
        if received and room >= 30:
            fix = f"{fix}. Received: {_clip(received, room)}" if fix else f"Received: {_clip(received, room)}"
        if fix:
            text = (text + " " if text.endswith("…") else text.rstrip(".") + ". ") + fix
        return text if text == whole else text + _MORE_IN_FULL


def _clip(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters cut at a word boundary, with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut).rstrip(" ,;:(") + "…"


# --- TF Serving's version-directory rule ------------------------------------------------------------------------
#
# TF Serving's file-system source lists the children of a base path and keeps every child whose whole name
# `ParseVersionNumber` accepts, with no check that it is a directory (tensorflow/serving
# tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc 87-89, 118-134, 274-286; commit
# 9d981c5c). Since 2.19 that is `absl::SimpleAtoi` into an int64 (abseil-cpp absl/strings/numbers.cc 1190-1260
# `safe_parse_sign_and_base`, 1477-1511 `safe_parse_positive_int`; commit 926f1d05): ASCII whitespace around the
# number is ignored, one `+` or `-` may lead, the rest must be ASCII digits, and the value must fit an int64.
# TF Serving 2.16 to 2.18 called TensorFlow's `strings::safe_strto64` instead (same file, line 88 at tag 2.18.0;
# tsl/platform/numbers.cc `safe_strto64`), which is the same rule except that it refuses a leading `+`.
# Two names of one number ("7", "007") are one version; the name that sorts last is loaded and the others ignored.

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_ASCII_WHITESPACE: Final = " \t\n\v\f\r"
"""`absl::ascii_isspace` (absl/strings/ascii.h 101-107): space, tab, newline, vertical tab, form feed, return."""
_ASCII_DIGITS: Final = frozenset("0123456789")


def parse_version(name: str) -> int | None:
    """The version number TF Serving reads from a base-path child named `name`, or None when it is no version.

    Examples: ``"1"`` is 1, ``"007"`` is 7, ``"-3"`` is -3, ``"temp-3"``, ``"1.5"``, ``"²"`` and ``"٣"`` are None.
    """
    text = name.strip(_ASCII_WHITESPACE)
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not set(digits) <= _ASCII_DIGITS:
        return None
    number = int(text)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


def version_paths(base_path: str | os.PathLike[str]) -> dict[int, Path]:
    """Every version TF Serving would see in `base_path`, by number, with the child it would load for it.

    Files count as TF Serving counts them (it then fails to load them); of two names for one number, the one that
    sorts last wins, as in TF Serving's `IndexChildrenByVersion`.

    Raises:
        OSError: `base_path` is missing, not a directory, or unreadable.
    """
    versions: dict[int, Path] = {}
    with os.scandir(base_path) as entries:
        for entry in sorted(entries, key=lambda entry: entry.name):
            number = parse_version(entry.name)
            if number is not None:
                versions[number] = Path(entry.path)
    return versions
