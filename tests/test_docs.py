"""The documentation site: the generated references cover every config key and CLI option, and
the whole site builds with `mkdocs build --strict` (broken links and missing pages fail)."""

from __future__ import annotations

import importlib.util
import os
import re
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


def _prose_paragraphs(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each blank-line-separated block outside code fences."""
    blocks, block, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if block:
                blocks.append((start, block))
            block = []
            continue
        if fenced:
            continue
        if line.strip():
            start = start if block else number
            block.append(line)
        elif block:
            blocks.append((start, block))
            block = []
    return [*blocks, (start, block)] if block else blocks


def test_no_page_has_a_sentence_cut_in_half():
    """Splitting the README into the site once left fragments: a paragraph that began with the
    indented tail of a list item, and sentences that stopped mid-way ("packs plain text into
    blocks of"). A prose block starts with a capital, a mark-up character or a digit, and
    ends with a punctuation mark, unless a code block, a list or a formula follows it."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    cut = []
    for page in pages:
        text = page.read_text()
        lines = text.splitlines()
        for number, block in _prose_paragraphs(text):
            first, last = block[0], block[-1].rstrip()
            if re.match(r" +[a-z]", first):
                cut.append(f"{page.relative_to(ROOT)}:{number}: starts mid-sentence: {first!r}")
            if first.startswith(("|", "#", "<", "!", ":", " ")):
                continue  # tables, headings, HTML, admonitions, indented code
            end = number + len(block) - 1
            after = next((x for x in lines[end:] if x.strip()), "")
            followed = after.lstrip().startswith("```") or after.startswith("    ")
            if re.search(r"[A-Za-z,(]$", last) and not followed:
                cut.append(f"{page.relative_to(ROOT)}:{end}: ends mid-sentence: {last!r}")
    assert not cut, "\n".join(cut)
