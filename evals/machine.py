"""What a speed measurement records about the machine it ran on: the load while it ran and the CPU (speeds compare
on the same CPU only)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def load_average() -> float:
    """The one-minute load average, to two decimals."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    widest = next((f for f in ("avx512_bf16", "avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{name} ({widest})"
