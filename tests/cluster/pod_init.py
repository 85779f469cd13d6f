"""The first program of every container the test node agent starts (node_agent.py): it gives the container the
view of the filesystem a pod has, then execs the container's command.

In a new mount and UTS namespace (nothing it does is visible outside the container's processes, and it all goes
away with them) it sets the pod's hostname, bind-mounts the pod's hosts file over /etc/hosts, and mounts each
volume (and the termination-message file) at its mountPath. A mountPath that does not exist on this machine is made
by shadowing its nearest existing ancestor: the ancestor is bind-mounted aside, a tmpfs goes over it, every entry
of the original is linked back into the tmpfs, and the missing directories are created there. So
``/dev/termination-log`` and ``/var/run/secrets/kubernetes.io/serviceaccount`` exist for the container while the
machine's /dev and /run stay untouched.

usage: python pod_init.py SPEC.json -- COMMAND [ARG...]
SPEC: {"hostname": str, "hosts_file": str, "shadow_dir": str, "workdir": str,
       "mounts": [{"source": host path, "target": container path, "read_only": bool}]}
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda value: value.encode() if value is not None else None  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
           f"mount {source} on {target}")


class Filesystem:
    """The container's mount namespace, shadowing directories as needed."""

    def __init__(self, shadow_dir: str) -> None:
        self.shadow_dir = shadow_dir
        self.shadowed: set[str] = set()

    def _shadow(self, directory: str) -> None:
        """Make ``directory`` (which exists) writable for this namespace alone, keeping its entries visible."""
        aside = os.path.join(self.shadow_dir, str(len(self.shadowed)))
        os.makedirs(aside, exist_ok=True)
        _mount(directory, aside, None, MS_BIND | MS_REC)
        _mount("tmpfs", directory, "tmpfs", 0, "mode=755")
        for entry in os.listdir(aside):
            original = os.path.join(aside, entry)
            link_target = os.readlink(original) if os.path.islink(original) else original
            os.symlink(link_target, os.path.join(directory, entry))
        self.shadowed.add(directory)

    def _make(self, path: str, is_dir: bool) -> None:
        """Create ``path`` (a mount point), shadowing its nearest existing ancestor first."""
        ancestor = os.path.dirname(path)
        while not os.path.isdir(ancestor):
            ancestor = os.path.dirname(ancestor)
        ancestor = os.path.realpath(ancestor)
        if ancestor == "/" and not os.path.isdir(os.path.dirname(path)):
            raise OSError(f"{path}: would need a new top-level directory on the machine")  # node_agent avoids it
        if ancestor != "/" and not any(ancestor == s or ancestor.startswith(s + "/") for s in self.shadowed):
            self._shadow(ancestor)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            open(path, "a").close()

    def mount(self, source: str, target: str, read_only: bool) -> None:
        is_dir = os.path.isdir(source)
        if os.path.islink(target) or not os.path.exists(target):
            if os.path.islink(target):  # an entry linked back by a shadow: replace the link by a real mount point
                os.unlink(target)
            self._make(target, is_dir)
        _mount(source, target, None, MS_BIND | MS_REC)
        if read_only:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(argv: list[str]) -> None:
    separator = argv.index("--")
    spec_path, command = argv[1], argv[separator + 1:]
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the node agent, like every other harness process
    if os.getppid() != parent:
        sys.exit(137)
    with open(spec_path) as handle:
        spec = json.load(handle)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    hostname = spec["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _mount(spec["hosts_file"], "/etc/hosts", None, MS_BIND)
    filesystem = Filesystem(spec["shadow_dir"])
    for mount in sorted(spec["mounts"], key=lambda m: m["target"].count("/")):
        filesystem.mount(mount["source"], mount["target"], mount.get("read_only", False))
    if not os.path.isdir(spec["workdir"]):
        filesystem._make(spec["workdir"], True)
    os.chdir(spec["workdir"])
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"pod_init: cannot run {command[0]!r}: {error}", file=sys.stderr)
        sys.exit(127 if isinstance(error, FileNotFoundError) else 126)


if __name__ == "__main__":
    main(sys.argv)
