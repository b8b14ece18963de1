"""The machine a figure was measured on, in one wording for every study and benchmark.

Timings are only comparable on the same CPU, so every committed row and benchmark record
names it; one helper keeps those names comparable across files."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path | None = None) -> str:
    """The CPU's model name (Linux's first "model name" line), else what `platform` knows,
    else "unknown CPU"."""
    try:
        for line in (cpuinfo or CPUINFO).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def host(cpuinfo: Path | None = None) -> str:
    """CPU model, core count, OS and architecture, e.g.
    "Intel(R) Xeon(R) Processor, 2 cores, Linux x86_64"."""
    return f"{cpu_model(cpuinfo)}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
