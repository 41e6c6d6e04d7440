import math

import numpy as np
import pytest

from cnf_prune.comparison_figures import pareto_front
from cnf_prune.comparison_stats import RunResult, RunSpec, dense_nfe_at, nfe_change_at_matched_nll, summarize


def run(label, sparsity, seed, *, nll, nfe, test_nll=1.0, steps=None):
    """A finished run whose validation curves are ``nll`` and ``nfe`` (lists)."""
    steps = np.arange(1, len(nll) + 1) * 100 if steps is None else np.asarray(steps)
    r = RunResult(RunSpec(label, sparsity, seed, ()), "done", wall_seconds=10.0, val_nll=nll[-1],
                  test_nll=test_nll, test_jac_norm=2.0, test_nfe=float(nfe[-1]), sparsity=sparsity)
    r.curves = {"val/nll": (steps, np.asarray(nll, float)), "val/nfe": (steps, np.asarray(nfe, float))}
    return r


def test_dense_nfe_is_interpolated_where_the_nll_is_first_reached():
    nll = (np.array([100, 200, 300, 400]), np.array([3.0, 2.0, 2.5, 1.0]))
    nfe = (np.array([100, 200, 300, 400]), np.array([20.0, 40.0, 50.0, 80.0]))
    assert dense_nfe_at(2.5, nll, nfe) == pytest.approx(30.0)  # halfway from 3.0 to 2.0
    assert dense_nfe_at(2.0, nll, nfe) == pytest.approx(40.0)  # first reached at step 200, not 300
    assert dense_nfe_at(5.0, nll, nfe) == pytest.approx(20.0)  # already at the first validation
    assert dense_nfe_at(1.5, nll, nfe) == pytest.approx(50.0 + (2.5 - 1.5) / 1.5 * 30.0)
    assert math.isnan(dense_nfe_at(0.5, nll, nfe))  # never reached


def test_nfe_change_at_matched_nll_averages_the_dense_seeds():
    dense = [run("dense", 0.0, 0, nll=[3.0, 2.0], nfe=[20, 40]), run("dense", 0.0, 1, nll=[3.0, 2.0], nfe=[30, 50])]
    pruned = run("random", 0.9, 0, nll=[3.2, 2.5], nfe=[10, 28])
    # dense seeds at NLL 2.5: 30 and 40 NFE; the pruned run's 28 is 20% below their mean 35
    assert nfe_change_at_matched_nll(pruned, dense) == pytest.approx(28 / 35 - 1)
    better = run("snip", 0.9, 0, nll=[3.0, 1.5], nfe=[10, 28])
    assert math.isnan(nfe_change_at_matched_nll(better, dense))


def test_summary_reports_standard_errors_and_counts_unmatched_seeds():
    dense = [run("dense", 0.0, s, nll=[3.0, 2.0], nfe=[20, 40], test_nll=t) for s, t in ((0, 1.0), (1, 2.0), (2, 4.0))]
    pruned = [run("random", 0.9, 0, nll=[2.5], nfe=[27]), run("random", 0.9, 1, nll=[2.5], nfe=[33]),
              run("random", 0.9, 2, nll=[1.0], nfe=[30])]
    rows = {r.label: r for r in summarize(dense + pruned)}
    std = np.std([1.0, 2.0, 4.0], ddof=1)
    assert rows["dense"].mean["test_nll"] == pytest.approx(7 / 3)
    assert rows["dense"].std["test_nll"] == pytest.approx(std)
    assert rows["dense"].se["test_nll"] == pytest.approx(std / math.sqrt(3))
    assert math.isnan(rows["dense"].mean["nfe_change"]) and rows["dense"].unmatched == 0
    # matched dense NFE at 2.5 is 30: changes -10% and +10%; the third seed beats dense
    assert rows["random"].mean["nfe_change"] == pytest.approx(0.0)
    assert rows["random"].se["nfe_change"] == pytest.approx(np.std([-0.1, 0.1], ddof=1) / math.sqrt(2))
    assert rows["random"].unmatched == 1


def test_pareto_front_keeps_the_points_nothing_beats_in_both():
    x = np.array([1.0, 2.0, 3.0, 1.5, 2.5, np.nan])
    y = np.array([5.0, 3.0, 1.0, 6.0, 3.5, 0.0])
    assert pareto_front(x, y).tolist() == [0, 1, 2]
