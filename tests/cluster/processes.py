"""Child processes of the test harness: started with their output in a log file, tied to the harness's life
(they get SIGKILL if the process that started them dies), and stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    """One long-running child process with its combined output in ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.cwd, preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; last lines of {self.log}:\n{self.log_tail()}"
            )

    def log_tail(self, max_bytes: int = 6000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; also reaps what is left of the group."""
        if self.popen is None:
            return
        pgid = self.popen.pid  # the child called setsid(): its pid is its process group
        if self.popen.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def kill_pod_processes(pods_dir: Path) -> list[int]:
    """SIGKILL every process whose environment says it belongs to a pod under ``pods_dir`` (the node agent sets
    RLHF_POD_DIR): the safety net for processes a pod left behind if its node agent died without cleaning up."""
    marker = f"RLHF_POD_DIR={pods_dir}/".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2, check=None):
    """Poll ``predicate()`` until it returns something truthy (returned); ``check()`` may raise to stop early."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - not ready yet; reported if it never becomes ready
            last_error = error
        time.sleep(interval_s)
    detail = f": {last_error}" if last_error else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}")
