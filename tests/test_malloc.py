"""tcmalloc for the trainer processes (rlhf_operator.malloc): found, preloaded, and off when asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_operator.malloc import LIBRARY, tcmalloc_path, with_tcmalloc
from rlhf_operator.runner import trainer_env


def test_preload_goes_first_once_and_can_be_turned_off(tmp_path):
    library = tmp_path / LIBRARY
    library.write_bytes(b"")
    env = with_tcmalloc({"RLHF_TCMALLOC": str(library), "LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"{library} /opt/other.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # weights are over 1 GiB: no stderr noise
    assert with_tcmalloc(env) == env  # already preloaded: unchanged
    assert "LD_PRELOAD" not in with_tcmalloc({"RLHF_TCMALLOC": "0"})
    assert "LD_PRELOAD" not in with_tcmalloc({"RLHF_TCMALLOC": str(tmp_path / "missing.so")})


def test_trainer_processes_run_on_tcmalloc_unless_turned_off(monkeypatch):
    """A process started with the local runner's environment has tcmalloc mapped (scripts/fetch-tcmalloc put it
    in the cache, or the system has it); with RLHF_TCMALLOC=0, glibc's malloc."""
    if tcmalloc_path({}) is None:
        pytest.skip("no tcmalloc on this machine and none fetched (scripts/fetch-tcmalloc needs apt-get)")

    def mapped_libraries() -> str:
        return subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=trainer_env(),
                              capture_output=True, text=True, check=True).stdout

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("RLHF_TCMALLOC", raising=False)
    assert LIBRARY in mapped_libraries()
    monkeypatch.setenv("RLHF_TCMALLOC", "0")
    assert "tcmalloc" not in mapped_libraries()
