"""The patient an image belongs to, read from its file name."""

from __future__ import annotations

import os
import re
from pathlib import Path

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(filename: str | os.PathLike) -> str:
    """The patient a file belongs to, read from its name.

    ``person123_bacteria_4.jpeg`` and ``person123_virus_9.jpeg`` -> ``person123`` (one patient);
    ``IM-0115-0001.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0012-0001.jpeg`` -> ``NORMAL2-IM-0012``.
    A name of any other pattern is its own patient: the file stem is returned.
    """
    name = Path(filename).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem
