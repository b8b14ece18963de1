"""The documentation site: the generated references cover every config key and CLI option, and
the whole site builds with `mkdocs build --strict` (broken links and missing pages fail)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from declora.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    path = ROOT / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    return _hooks()


def test_every_config_key_is_in_the_configuration_reference(ref):
    page = ref.config_reference()
    keys = [k for k, _ in ref.leaf_fields(RunConfig)]
    assert len(keys) > 90 and "log.to" in keys and "topology.mixing" in keys
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, f"not in the configuration reference: {missing}"
    row = next(line for line in page.splitlines() if line.startswith("| `comm.bits` |"))
    assert "`32`" in row and "`4`" in row and "quantization bits" in row  # accepted, paper


def test_the_notes_only_name_keys_that_exist(ref):
    notes = yaml.safe_load((ROOT / "docs/config_notes.yaml").read_text())
    keys = {k for k, _ in ref.leaf_fields(RunConfig)}
    assert set(notes) - keys == set(), "docs/config_notes.yaml names keys the schema lacks"


def test_every_command_and_option_is_in_the_cli_reference(ref):
    import typer

    from declora.cli import app

    page = ref.cli_reference()
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="declora")
    for name in group.list_commands(ctx):
        assert f"## `declora {name}`" in page
        for p in group.get_command(ctx, name).params:
            if p.param_type_name == "option":
                assert f"`{p.opts[0]}`" in page, (name, p.opts)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="the docs extra is not installed (make test installs it)",
)
def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    config = (site / "reference/configuration/index.html").read_text()
    for key, _ in _hooks().leaf_fields(RunConfig):
        assert f"<code>{key}</code>" in config, key
    assert "declora sweep" in (site / "reference/cli/index.html").read_text()
    api = (site / "reference/api/index.html").read_text()
    assert "build_topology" in api and "Trackers" in api  # mkdocstrings rendered the API
    assert (site / "guides/trackers/index.html").is_file()
