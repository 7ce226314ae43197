"""Version skew between the TensorFlow that writes an export and the TF Serving that will load it.

A SavedModel records the ops and op attributes of the TensorFlow that wrote it. TF Serving is built against one
TensorFlow release (TF Serving 2.20 is TensorFlow 2.20); an older server can fail to load an export that uses an op
or attribute added later. `--serving-version` names the TF Serving release the user deploys; a newer writer gets a
one-line warning in the summary and the manifest, which also records the named version.
"""

from __future__ import annotations

import re

from ema_export.errors import ServingVersionError

_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?$")
_WRITER_RELEASE = re.compile(r"^(\d+)\.(\d+)")


def parse_release(text: str) -> tuple[int, int]:
    """`"2.20"` or `"2.20.0"` as `(2, 20)`.

    Raises:
        ServingVersionError: `text` is not MAJOR.MINOR or MAJOR.MINOR.PATCH.
    """
    match = _RELEASE.match(text.strip())
    if not match:
        raise ServingVersionError("--serving-version must be a TF Serving release such as 2.20 or 2.20.0",
                                  hint=f"Pass the tag of the tensorflow/serving image you deploy. Received: {text!r}")
    return int(match[1]), int(match[2])


def skew_warning(serving_version: str | None, writer_version: str) -> str | None:
    """The warning when TensorFlow `writer_version` is newer than TF Serving `serving_version`, else None."""
    if serving_version is None:
        return None
    serving = parse_release(serving_version)
    match = _WRITER_RELEASE.match(writer_version)
    if match is None or (int(match[1]), int(match[2])) <= serving:
        return None
    return (f"this export is written by TensorFlow {writer_version}, newer than TF Serving {serving_version} "
            f"(--serving-version): TF Serving {serving_version} may fail to load ops or attributes added since; "
            f"serve it with tensorflow/serving:{match[1]}.{match[2]} or newer, or export with TensorFlow "
            f"{serving[0]}.{serving[1]}")
