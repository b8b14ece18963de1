"""The one wording of "which machine measured this" that rows and benchmarks record."""

from __future__ import annotations

import os
import platform

import declora.reporting.machine as machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example CPU @ 2.10GHz
flags\t\t: fpu avx512f amx_bf16

processor\t: 1
model name\t: Example CPU @ 2.10GHz
"""


def test_the_cpu_model_is_the_first_model_name_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert machine.cpu_model(info) == "Example CPU @ 2.10GHz"


def test_a_bare_model_name_is_told_apart_by_its_family_and_model_numbers(tmp_path):
    """Two EPYC generations both call themselves "AMD EPYC" in a virtual machine; the numbers
    of the first processor tell them apart, so their timings are not pooled."""
    info = tmp_path / "cpuinfo"
    block = "processor\t: {p}\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\n"
    info.write_text(block.format(p=0, f=26, m=2) + "\n" + block.format(p=1, f=25, m=1))
    assert machine.cpu_model(info) == "AMD EPYC (family 26 model 2)"
    info.write_text(block.format(p=0, f=25, m=1))
    assert machine.cpu_model(info) == "AMD EPYC (family 25 model 1)"
    assert "," not in machine.cpu_model(info)  # rows are grouped by the text before a comma


def test_without_a_model_name_the_cpu_model_falls_back_to_platform(tmp_path, monkeypatch):
    """ARM's /proc/cpuinfo has no "model name" line; other systems have no such file."""
    no_name = tmp_path / "cpuinfo"
    no_name.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert machine.cpu_model(no_name) == "arm"
    assert machine.cpu_model(tmp_path / "missing") == "arm"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert machine.cpu_model(tmp_path / "missing") == "unknown CPU"


def test_the_host_names_cpu_cores_system_and_architecture(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    monkeypatch.setattr(machine, "CPUINFO", info)
    assert machine.host() == (
        f"Example CPU @ 2.10GHz, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    )
