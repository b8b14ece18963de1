"""The run report's plots draw what there is, and say so when there is nothing."""

import warnings

from declora.reporting.plots import metric_per_round


def test_a_metric_with_no_values_gives_a_plot_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend without artists
        out = metric_per_round({"dec-lora": ([], [])}, "accuracy", tmp_path / "empty.png")
        full = metric_per_round({"dec-lora": ([1, 2], [0.5, 0.6])}, "accuracy", tmp_path / "a.png")
    assert out.stat().st_size > 0 and full.stat().st_size > 0
