"""What this CPU is, as ``/proc/cpuinfo`` says: its vendor and its instruction-set flags (empty off Linux)."""

from __future__ import annotations

from functools import cache


@cache
def _first_processor() -> dict[str, str]:
    """The fields of the first processor ``/proc/cpuinfo`` lists (every core of a machine reports the same)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags, as the kernel names them (``avx512f``, ``amx_bf16``, ...)."""
    return frozenset(_first_processor().get("flags", "").split())


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... or "" where the kernel does not say."""
    return _first_processor().get("vendor_id", "")
