"""What a run shows: the summary table, report.md, plots, run comparisons, trackers."""
