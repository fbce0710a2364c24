"""What the benchmarks ran on, for their printed and JSON results."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """'<CPU model name>, <n> logical cores' (from /proc/cpuinfo where it exists)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"
