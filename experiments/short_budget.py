"""The short-budget suite's summary table with computed intervals and verdicts.

    python experiments/short_budget.py              # print the table
    python experiments/short_budget.py --write-docs # + into docs/results.md (short-budget-table)

The suite of `experiments/reproduce.py` kept, for each setting, the paired gap Dec-LoRA minus
centralized LoRA as mean and sample standard deviation over seeds 0-2 (the tables of
docs/results.md below the summary, where each figure appears). This script turns each into a
95% t-interval and the verdict against the same 1-point margin as the plateau study
(`declora.reporting.paired`), so no verdict word on the page is written by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from declora.reporting.generated import write_between
from declora.reporting.paired import gap_from_summary

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 1.0  # points (percent of perplexity for SmolLM2), as in experiments/plateau.py
SEEDS = 3

# (setting, mean, sd, unit): Dec-LoRA minus centralized, final round, from the tables below
# the summary in docs/results.md. For perplexity the sign is flipped (centralized minus
# Dec-LoRA), so that a negative gap means Dec-LoRA is worse on every row.
GAPS: tuple[tuple[str, float, float, str], ...] = (
    ("iid, 10-peer ring, r=8", -0.7, 3.4, "points"),
    ("Dirichlet 10, 10-peer ring, r=8", -1.0, 2.3, "points"),
    ("Dirichlet 1, 10-peer ring, r=8", -2.2, 5.2, "points"),
    ("the paper's 3-peer label skew", 1.0, 2.4, "points"),
    ("Dirichlet 0.5, 10-peer ring, r=8 (the reference cell)", -4.5, 2.4, "points"),
    ("the same, peers weighted by data size", -1.3, 3.5, "points"),
    ("FedAvg, exact average every round (10 peers, r=8, Dirichlet 0.5)", -1.6, 2.1, "points"),
    ("Dirichlet 0.1, 10-peer ring, r=8", -30.0, 19.0, "points"),
    ("Dirichlet 0.1, weighted by data size", -16.0, 2.6, "points"),
    ("K=5 local steps, same examples as K=1", -12.0, 7.0, "points"),
    ("4-bit gossip, 7.5x fewer bytes (Dirichlet 0.5 ring)", -4.3, 2.4, "points"),
    ("100 peers, 1 example each, ER graph", -9.1, 5.4, "points"),
    (
        "SmolLM2-135M, 6 peers, natural split, 3 gossip exchanges a round (perplexity)",
        -3.7,
        1.4,
        "% of perplexity",
    ),
)


def table() -> str:
    lines = [
        f"| setting | gap (mean ± sd, {SEEDS} seeds) | 95% interval | verdict (margin "
        f"{MARGIN:g}) |",
        "|---|---:|---|---|",
    ]
    for setting, mean, sd, unit in GAPS:
        g = gap_from_summary(mean, sd, SEEDS, MARGIN)
        lines.append(
            f"| {setting} | {mean:+.1f} ± {sd:.1f} {unit} | [{g.low:+.1f}, {g.high:+.1f}] | "
            f"{g.verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    text = table()
    print(text)
    if args.write_docs:
        write_between([ROOT / "docs" / "results.md"], "short-budget-table", text)


if __name__ == "__main__":
    main()
