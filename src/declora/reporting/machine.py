"""The machine a figure was measured on, in one wording for every study and benchmark.

Timings are only comparable on the same CPU, so every committed row and benchmark record
names it; one helper keeps those names comparable across files."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path | None = None) -> str:
    """The CPU's model name (Linux's first "model name" line) with its family and model numbers
    where Linux gives them, else what `platform` knows, else "unknown CPU".

    A virtual machine's model name can be as bare as "AMD EPYC", shared by CPU generations up
    to 1.7x apart in speed; the family and model numbers tell them apart."""
    fields: dict[str, str] = {}
    try:
        for line in (cpuinfo or CPUINFO).read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and fields:
                break  # the first processor's block is enough
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or "unknown CPU"
    family, model = fields.get("cpu family"), fields.get("model")
    return f"{name} (family {family} model {model})" if family and model else name


def host(cpuinfo: Path | None = None) -> str:
    """CPU model, core count, OS and architecture, e.g.
    "Intel(R) Xeon(R) Processor, 2 cores, Linux x86_64"."""
    return f"{cpu_model(cpuinfo)}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
