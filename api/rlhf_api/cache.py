"""The project's cache folder on this machine: built binaries, the converted builtin models, tcmalloc.

``RLHF_CACHE_DIR`` when set, otherwise ``~/.cache/rlhf-operator``. The shell scripts under ``scripts/`` and
``tests/cluster/`` spell the same rule as ``${RLHF_CACHE_DIR:-$HOME/.cache/rlhf-operator}``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-operator")
