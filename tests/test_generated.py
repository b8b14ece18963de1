"""Measured tables are written between markers of hand-written pages, never copied by hand."""

from declora.reporting.generated import write_between


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
