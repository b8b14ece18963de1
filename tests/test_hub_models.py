"""A hub model id on a machine that cannot reach the hub: refused at once with what would work,
or loaded from the Hugging Face cache, instead of a minute of huggingface_hub's retries.

The hub these tests cannot reach is a closed port on the loopback interface: nothing leaves the
machine."""

from __future__ import annotations

import json
import socket
import time

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from declora.cli import app
from tests.conftest import run_cli, write_ring_job

runner = CliRunner()


def closed_loopback_endpoint() -> str:
    """An http address on 127.0.0.1 where nothing listens: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def unreachable_hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a closed local port, with an empty cache of its own."""
    monkeypatch.setattr(constants, "ENDPOINT", closed_loopback_endpoint())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


@pytest.mark.parametrize(
    ("sets", "offline", "said"),
    [
        (
            ["model.name=nobody/no-such-model"],
            False,
            [
                "'nobody/no-such-model'",
                "not in the Hugging Face cache",
                "cannot be reached",
                "Connect",
                "offline choices: minilm",
            ],
        ),
        (
            ["task=causal-lm", "data.name=chatterbot", "model.name=nobody/no-such-lm"],
            False,
            ["'nobody/no-such-lm'", "cannot be reached", "offline choices: smollm2"],
        ),
        (
            ["model.name=nobody/no-such-model"],
            True,
            ["not in the Hugging Face cache", "HF_HUB_OFFLINE is set", "offline choices: minilm"],
        ),
        (["model.name=no such model"], False, ["nor a valid hub id", "offline choices: minilm"]),
    ],
    ids=["classifier-unreachable", "causal-lm-unreachable", "offline-mode", "malformed-id"],
)
def test_a_hub_id_that_cannot_be_loaded_here_is_refused_at_once(
    unreachable_hub, monkeypatch, tmp_path, sets, offline, said
):
    """Before, this waited about a minute on retries and then printed the hub client's own
    words; the refusal now comes before the run is announced, and says what loads offline."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    out = tmp_path / "out"
    args = [arg for s in sets for arg in ("--set", s)]
    start = time.perf_counter()
    res = runner.invoke(app, ["run", "--out", str(out), *args])
    elapsed = time.perf_counter() - start
    assert res.exit_code == 2, res.output
    text = " ".join(res.stderr.split())
    assert all(part in text for part in said), text
    assert "declora:" not in res.stderr.split("error:")[0], "no banner before the refusal"
    assert "Traceback" not in res.output and not out.exists()
    assert elapsed < 10, f"refused after {elapsed:.1f} s"


def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(tmp_path, tokenizer):
    """A model in the cache trains with the hub out of reach, without one retry: the loader
    asks the cache alone once the probe found no hub."""
    job = write_ring_job(tmp_path, tokenizer, seed=3, rounds=2)
    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--declora-test--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot)
    (repo / "snapshots").mkdir()
    (job / "model").rename(repo / "snapshots" / snapshot)
    env = {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_ENDPOINT": closed_loopback_endpoint(),
        "HF_HUB_OFFLINE": "0",
    }
    out = tmp_path / "run"
    res = run_cli(
        "run",
        "--config",
        str(job / "job.yaml"),
        "--out",
        str(out),
        "--set",
        "model.name=declora-test/tiny-bert",
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Retrying" not in res.stderr, res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
