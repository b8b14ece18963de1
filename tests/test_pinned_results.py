"""Refactors keep results bit-identical: adapters of fixed jobs match pins written before.

The jobs run in one fresh process under the portable kernels of `tests/pinned/jobs.py`, so
the pins hold on any x86 machine, not only on the one that wrote them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pinned.jobs import PIN_FILE, PORTABLE_KERNELS, jobs

PINS = json.loads(PIN_FILE.read_text())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def found(tmp_path_factory, minilm_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pinned")  # the inputs are made in that process too
    proc = subprocess.run(
        [sys.executable, "-m", "tests.pinned.digest_all", "--root", str(root)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **PORTABLE_KERNELS},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(PINS))
def test_adapters_are_bit_identical_to_the_pins(found, name):
    assert found[name] == PINS[name]


def test_every_job_is_pinned(tmp_path):
    assert set(jobs(tmp_path)) == set(PINS)
