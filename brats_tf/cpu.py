"""What the host CPU can do, read without TensorFlow: its feature flags
(conv_grad's choice of kernel gradient; the benchmarks' machine line)."""

from __future__ import annotations


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset | None:
    """The CPU's feature flags from the first ``flags`` line of a Linux
    cpuinfo file; None where there is none (other systems, other CPUs)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None
