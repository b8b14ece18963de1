"""Refactors keep results bit-identical: adapters of fixed jobs match pins written before."""

from __future__ import annotations

import json

import pytest

from tests.conftest import WORDS, run_in_process
from tests.pinned.jobs import PIN_FILE, adapter_digest, jobs, write_inputs

PINS = json.loads(PIN_FILE.read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pinned")
    write_inputs(root, tokenizer, WORDS)
    return root


@pytest.mark.parametrize("name", sorted(PINS))
def test_adapters_are_bit_identical_to_the_pins(inputs, name):
    out = inputs / "runs" / name
    args = ["run", "--quiet", "--out", str(out)]
    for kv in jobs(inputs)[name]:
        args += ["--set", kv]
    proc = run_in_process(*args)  # every job sets train.threads=1
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert adapter_digest(out) == PINS[name]


def test_every_job_is_pinned(tmp_path):
    assert set(jobs(tmp_path)) == set(PINS)
