"""tcmalloc for the trainer processes, where the machine has it.

PyTorch on CPU allocates every activation, gradient and logits tensor afresh from the C library. glibc serves
blocks of these sizes with fresh pages (or its own mmap) far more often than with the ones just freed, so a
training step pays a page fault for much of what it allocates and keeps the freed memory mapped. tcmalloc reuses
freed blocks: a PPO step pays almost no page faults and peaks lower (figures: docs/measurements.md, "tcmalloc").
Intel's PyTorch CPU tuning guide recommends the same preload.

The local runner preloads it into every ``rlhf-train`` process where it is found (on the system, or unpacked
into the cache by ``scripts/fetch-tcmalloc``, which ``scripts/in-venv`` runs); ``RLHF_TCMALLOC=0`` leaves
glibc's malloc, ``RLHF_TCMALLOC=/path/to/lib.so`` picks another library. ``bench/ppo_step.py`` uses it unless
``--glibc``; the trainer image installs it and preloads it.

(It was opt-in for a while: a resume-exactness test failed once in CI while it was the runner's default. That
test starts its trainer processes with the test's own environment, never the runner's, so they ran on glibc:
the failure was not tcmalloc's. See ``tests/test_ppo_stage.py`` for what it was.)
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_api.cache import cache_root

LIBRARY = "libtcmalloc_minimal.so.4"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def cache_dir() -> Path:
    """Where ``scripts/fetch-tcmalloc`` unpacks the library."""
    return cache_root() / "tcmalloc"


def tcmalloc_path(env: dict[str, str] | None = None) -> Path | None:
    """The tcmalloc library to preload, or None (turned off, or not on this machine)."""
    choice = (env if env is not None else os.environ).get("RLHF_TCMALLOC", "")
    if choice == "0":
        return None
    if choice not in ("", "1"):
        return Path(choice) if Path(choice).is_file() else None
    for directory in (*SYSTEM_DIRS, str(cache_dir())):
        candidate = Path(directory) / LIBRARY
        if candidate.is_file():
            return candidate
    return None


def with_tcmalloc(env: dict[str, str]) -> dict[str, str]:
    """``env`` with tcmalloc first in ``LD_PRELOAD`` (unchanged when it is already there or not found)."""
    library = tcmalloc_path(env)
    preload = env.get("LD_PRELOAD", "")
    if library is None or LIBRARY in preload:
        return env
    # tcmalloc reports allocations over 1 GiB on stderr; a model's weights are one, and not news
    return {**env, "LD_PRELOAD": f"{library} {preload}".strip(),
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": env.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))}
