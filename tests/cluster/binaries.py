"""Where the test cluster's binaries live, and building them on first use (``build-binaries.sh``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rlhf_api.cache import cache_root

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-binaries.sh"
VERSIONS_FILE = HERE / "versions.env"

#: component -> (version key in versions.env, binaries it provides)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kubernetes": ("KUBERNETES_VERSION", ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")),
    "etcd": ("ETCD_VERSION", ("etcd",)),
    "minio": ("MINIO_VERSION", ("minio",)),
}


def versions() -> dict[str, str]:
    """The pinned versions from ``versions.env``."""
    pairs = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def bin_root() -> Path:
    return cache_root() / "bin"


def component_dir(component: str) -> Path:
    """``<cache>/bin/<component>-<version>``: where the component's binaries are (or will be) built."""
    key, _ = COMPONENTS[component]
    return bin_root() / f"{component}-{versions()[key]}"


def is_built(component: str) -> bool:
    return (component_dir(component) / ".complete").is_file()


#: components whose build failed in this process: not retried (a failing build is slow to fail again)
FAILED: dict[str, str] = {}


def ensure(component: str) -> Path:
    """The directory holding ``component``'s binaries, building them first if they are not cached (a cold
    build takes about 20 minutes; see README.md). Raises ``RuntimeError`` if the build fails."""
    if component in FAILED:
        raise RuntimeError(FAILED[component])
    if not is_built(component):
        # The build's progress goes to the real stderr so a first run does not look hung under pytest's capture.
        try:
            result = subprocess.run(["bash", str(BUILD_SCRIPT), component], stdout=subprocess.PIPE,
                                    stderr=sys.__stderr__)
            code = result.returncode
        except OSError as error:
            code = f"{error}"
        if code != 0 or not is_built(component):
            FAILED[component] = f"{BUILD_SCRIPT} {component} failed ({code}); see its output above"
            raise RuntimeError(FAILED[component])
    return component_dir(component)


def binary(component: str, name: str) -> Path:
    """Path of binary ``name`` of ``component``, built if needed."""
    return ensure(component) / name
