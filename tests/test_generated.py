"""Measured tables are written between markers of hand-written pages, never copied by hand."""

from declora.reporting.generated import write_between, write_rows_table


def test_only_the_text_between_the_markers_changes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- t -->\nold | table\n<!-- /t -->\nprose after\n")
    other = tmp_path / "other.md"
    other.write_text("no markers here\n")
    written = write_between([page, other], "t", "| new |\n|---|\n")
    assert written == [page]
    assert page.read_text() == "intro\n<!-- t -->\n| new |\n|---|\n<!-- /t -->\nprose after\n"
    assert other.read_text() == "no markers here\n"
    write_between([page], "t", "| new |\n|---|\n")  # idempotent
    assert page.read_text().count("<!-- t -->") == 1


def test_a_benchmarks_table_is_made_from_its_raw_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"seed": 0, "acc": 0.5}\n\n{"seed": 1, "acc": 0.75}\n')
    page = tmp_path / "page.md"
    page.write_text("<!-- t -->\n<!-- /t -->\n")

    def table(got):
        return "\n".join(f"| {r['seed']} | {r['acc']} |" for r in got)

    assert write_rows_table(rows, [page], "t", table) == [page]
    assert page.read_text() == "<!-- t -->\n| 0 | 0.5 |\n| 1 | 0.75 |\n<!-- /t -->\n"
