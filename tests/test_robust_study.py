"""benchmarks/robust.py: the plan's order, and the target and tables computed from rows
(no training)."""

from __future__ import annotations

from benchmarks import robust


def _row(attackers: int, attack: str, rule: str, seed: int, acc: float | None) -> dict:
    row = dict(graph="regular4", attackers=attackers, attack=attack, rule=rule, seed=seed,
               honest_accuracy=acc, gossip_seconds=0.1)  # fmt: skip
    if acc is None:
        row["diverged"] = "round 5: peer 0 diverged"
    return row


def test_the_plan_answers_the_target_first_and_has_the_cut_off_reference():
    cells = robust.planned(robust._defaults())
    # none, clip, trimmed-mean, median, clip-exclude against every attack and without one;
    # clip-exclude-stale against the stale attack only; clip-exclude-b2 on the 4-regular graph
    # with 2 attackers and without one
    rules = len(robust.RULES) - 2
    per_graph_seed = rules + 2 * (5 * rules + 1 + 1)
    b2 = [c for c in cells if c[3] == "clip-exclude-b2"]
    assert len(cells) == len(set(cells)) == 2 * 3 * per_graph_seed + len(b2)
    assert len(b2) == 3 * (1 + 5) and {c[:2] for c in b2} == {("regular4", 0), ("regular4", 2)}
    stale_check = [c for c in cells if c[3] == "clip-exclude-stale"]
    assert len(stale_check) == 2 * 3 * 2 and {c[2] for c in stale_check} == {"stale"}
    first = cells[: 3 * (rules + 1 + 5 * rules + 2)]  # the 4-regular graph, 0 and 1 attacker
    assert {(g, a) for g, a, *_ in first} == {("regular4", 0), ("regular4", 1)}
    assert ("regular4", 1, robust.ABSENT, "none", 0) in first
    assert all(c[1] == 2 for c in cells[-len(cells) // 3 :])  # 2 attackers last


def test_the_target_table_decides_from_paired_seeds():
    rows = [_row(0, "none", r, s, 0.65 + 0.01 * s) for r in robust.RULES for s in range(3)]
    rows += [_row(1, "sign-flip", "clip", s, 0.645 + 0.01 * s + 0.001 * (s == 1)) for s in range(3)]
    rows += [_row(1, "sign-flip", "median", s, 0.60 + 0.01 * s) for s in range(3)]
    rows += [_row(1, "sign-flip", "none", s, None if s == 2 else 0.4) for s in range(3)]
    rows += [_row(1, robust.ABSENT, "none", s, 0.63 + 0.01 * s) for s in range(3)]
    table = robust.target_lines(rows)
    flip = next(line for line in table if line.startswith("| sign-flip |"))
    cells = [c.strip() for c in flip.strip("|").split("|")]
    # columns: the rules with a 1-attacker cell
    assert table[0] == "| attack | `none` | `clip` | `median` | shown within 2 points |"
    assert cells[1] == "diverged in 1 of 3"  # plain gossip
    assert cells[2].startswith("-0.47 [") and cells[-1] == "clip"  # within 2 points: clip only
    assert cells[3].startswith("-5.00 [")  # median: 5 points down on every seed
    assert "cut off from the start" in table[-1] and "-2.00" in table[-1]
    text = robust.tables(rows)
    assert "| sign-flip | 0.400 ± 0.000 (2); diverged in 1 |" in text
    assert "attacker(s) cut off (reference)" in text


def test_a_rule_measured_in_some_tables_only_is_a_column_of_those_only():
    rows = [_row(0, "none", r, s, 0.65) for r in ("none", "clip-exclude-b2") for s in range(2)]
    rows += [_row(1, "scaled", "none", s, 0.5) for s in range(2)]
    rows += [_row(2, "scaled", r, s, 0.4) for r in ("none", "clip-exclude-b2") for s in range(2)]
    text = robust.tables(rows)
    one = text.split("**regular4, 1 attacker")[1].split("**regular4, 2 attackers")[0]
    two = text.split("**regular4, 2 attackers")[1].split("**The target")[0]
    assert "| attack | `none` |\n" in one  # the only rule with a 1-attacker cell
    assert "| attack | `none` | `clip-exclude-b2` |" in two
    assert "| no attacker | 0.650 ± 0.000 (2) | 0.650 ± 0.000 (2) |" in two


def test_every_setting_gets_its_gaps_with_each_rules_cost_without_an_attacker():
    rows = [_row(0, "none", "none", s, 0.65 + 0.01 * s) for s in range(3)]
    rows += [_row(0, "none", "clip", s, 0.62 + 0.01 * s + 0.001 * (s == 1)) for s in range(3)]
    rows += [_row(1, "scaled", r, s, 0.60 + 0.01 * s) for r in ("none", "clip") for s in range(3)]
    ring = [dict(r, graph="ring") for r in rows]
    ring += [dict(_row(2, "scaled", "clip", s, 0.5 + 0.01 * s), graph="ring") for s in range(3)]
    table = robust.target_lines(ring, "ring", 1)
    cost = next(line for line in table if line.startswith("| no attacker (the rule's cost) |"))
    cells = [c.strip() for c in cost.strip("|").split("|")]
    assert cells[1] == "reference" and cells[2].startswith("-2.97 [")  # clip's cost: 3 points
    assert cells[-1] == "none"  # not shown within 2 points
    assert robust.target_lines(ring, "ring", 2)[2].startswith("| no attacker")
    assert robust.target_lines(ring, "regular4", 1) == []  # no 4-regular row
    text = robust.tables(rows + ring)
    assert "**The target, computed**" in text  # the 4-regular graph, 1 attacker
    assert "**ring, 1 attacker, computed**" in text and "**ring, 2 attackers, computed**" in text
    assert "**regular4, 2 attackers, computed**" not in text  # nothing measured there


def test_a_cell_claimed_by_a_live_process_is_not_taken_and_a_dead_ones_is(tmp_path):
    import subprocess
    import sys

    cell = ("ring", 2, "scaled", "clip", 1)
    assert robust.claim(tmp_path, cell)
    assert not robust.claim(tmp_path, cell)  # this process holds it
    assert robust.claim(tmp_path, ("ring", 2, "scaled", "clip", 2))  # another cell
    path = tmp_path / "ring__2__scaled__clip__1.claim"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    path.write_text(gone)  # claimed by a process that has ended: taken over
    assert robust.claim(tmp_path, cell) and path.read_text() == str(__import__("os").getpid())
    path.write_text("")  # a claim being written counts as taken
    assert not robust.claim(tmp_path, cell)
