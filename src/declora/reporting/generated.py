"""Tables that scripts write into hand-written pages, between `<!-- NAME -->` and
`<!-- /NAME -->` markers, so measured figures are never copied by hand and cannot drift."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def write_between(paths: Iterable[Path], name: str, body: str) -> list[Path]:
    """Replace what stands between the markers `name` in each page that has them (the markers
    stay); returns the pages written."""
    mark = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    written = []
    for path in paths:
        text = path.read_text()
        if mark.search(text):
            path.write_text(mark.sub(lambda _: block, text))
            written.append(path)
    return written


def write_rows_table(
    rows: Path, pages: Iterable[Path], name: str, table: Callable[[list[dict[str, Any]]], str]
) -> list[Path]:
    """`write_between` of the table that `table` makes from a JSONL file of raw rows: what a
    benchmark's `--write-docs` does."""
    parsed = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    return write_between(pages, name, table(parsed))
