"""summary.json as a strict JSON consumer reads it (no bare NaN or Infinity), the one-line
warnings of degenerate results, and a toy2d run whose every weight nu/rho underflows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from diffsens_cli.pipelines.first_order import _roundoff_below
from diffsens_cli.plots import synthetic
from diffsens_cli.rundir import RunDir, dotted
from diffsens_cli.stages import StageCache


def strict_loads(text: str):
    """``json.loads`` that, like JavaScript's JSON.parse and jq, rejects NaN and Infinity."""
    def reject(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=reject)


def test_summary_writes_null_for_every_non_finite_number_and_says_why(tmp_path):
    run = RunDir(tmp_path / "run", StageCache(tmp_path / "stages"))
    metrics = {"retrain": {"median_corr": float("nan"), "num_samples": 0}, "ratio": float("inf"),
               "ode/step 0.05": {"slope": np.float32("nan"), "r": np.array([0.5, np.nan, -np.inf])},
               "fine": np.float32(0.25)}
    reasons = {"metrics.retrain.median_corr": "no sample had a finite correlation"}
    path = run.write_summary(metrics, reasons, history=[{"loss": float("-inf")}, {"loss": 1.5}])
    summary = strict_loads(path.read_text())
    assert summary["metrics"] == {"retrain": {"median_corr": None, "num_samples": 0}, "ratio": None,
                                  "ode/step 0.05": {"slope": None, "r": [0.5, None, None]}, "fine": 0.25}
    assert summary["history"] == [{"loss": None}, {"loss": 1.5}]
    assert summary["null_values"] == {
        "metrics.retrain.median_corr": "NaN: no sample had a finite correlation",
        "metrics.ratio": "+inf",
        'metrics["ode/step 0.05"].slope': "NaN",
        'metrics["ode/step 0.05"].r[1]': "NaN",
        'metrics["ode/step 0.05"].r[2]': "-inf",
        "history[0].loss": "-inf",
    }
    assert summary["warnings"] == []


def test_summary_of_finite_values_has_no_null_values(tmp_path):
    path = RunDir(tmp_path / "run", StageCache(tmp_path / "stages")).write_summary({"x": np.arange(3)})
    summary = strict_loads(path.read_text())
    assert summary["metrics"] == {"x": [0, 1, 2]} and "null_values" not in summary


def test_dotted_paths_quote_keys_with_dots():
    assert dotted("metrics", "retrain", "median_corr") == "metrics.retrain.median_corr"
    assert dotted("metrics", "ode/step 0.05", "median_remainder_over_eta", "1e-06") == \
        'metrics["ode/step 0.05"].median_remainder_over_eta.1e-06'
    assert dotted("history", 2, "loss") == "history[2].loss"


@pytest.mark.parametrize("weights,line", [
    ({"evaluated": 160, "nonfinite": 0, "underflow": 160},
     "diffsens: warning: psi is identically zero: all 160 weights nu/rho underflowed in float32; "
     "use solver.dtype=float64 or a perturbation nearer the data\n"),
    ({"evaluated": 160, "nonfinite": 10, "underflow": 150},
     "diffsens: warning: psi is identically zero: 150 of 160 weights nu/rho underflowed in float32 and 10 were "
     "NaN or infinite; use solver.dtype=float64 or a perturbation nearer the data\n"),
    ({"evaluated": 160, "nonfinite": 0, "underflow": 0},
     "diffsens: warning: psi is identically zero: no weight nu/rho underflowed: nu's score equals rho's where "
     "nu/rho > 0 (160 weights)\n"),
    ({"evaluated": 160, "nonfinite": 160, "underflow": 0},
     "diffsens: warning: psi is identically zero: all 160 log weights log(nu/rho) were NaN or infinite in float32 "
     "(a log-density overflowed); use solver.dtype=float64 or a perturbation nearer the data\n"),
])
def test_zero_psi_warns_in_one_line_with_the_cause(tmp_path, capsys, weights, line):
    run = RunDir(tmp_path / "run", StageCache(tmp_path / "stages"))
    run.warn_if_zero_psi(np.ones((4, 2), np.float32), weights)
    assert capsys.readouterr().err == ""
    run.warn_if_zero_psi([np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32)], weights)
    assert capsys.readouterr().err == line
    summary = strict_loads(run.write_summary({}).read_text())
    assert summary["warnings"] == [line.removeprefix("diffsens: warning: ").rstrip("\n")]


def test_zero_psi_in_float64_does_not_advise_float64(tmp_path, capsys):
    """A run already in float64 whose weights all underflow is told the true cause, not to
    switch to the dtype it uses."""
    run = RunDir(tmp_path / "run", StageCache(tmp_path / "stages"))
    run.warn_if_zero_psi(np.zeros((4, 2)), {"evaluated": 160, "nonfinite": 0, "underflow": 160})
    assert capsys.readouterr().err == (
        "diffsens: warning: psi is identically zero: all 160 weights nu/rho underflowed in float64; nu is beyond "
        "float64's range from the samples: check the perturbation's scale\n")


def test_roundoff_stall_is_where_the_remainder_is_flat_at_epsilon():
    """float32 eps = 2^-23 = 1.19e-7; samples of norm 2 put round-off at |R| <= 10 eps 2 = 2.4e-6.
    |R| = eta * r: 1.2e-7, 1.3e-7, 2e-7 (eta <= 1e-4) are round-off, 6e-6 at eta = 1e-3 is not."""
    etas = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    samples = np.full((5, 4), 1.0, np.float32)  # |Phi^0| = 2
    r = np.array([0.12, 0.013, 0.002, 0.006, 0.05])
    assert _roundoff_below(etas, r, samples) == 1e-4
    assert _roundoff_below(etas, r, samples.astype(np.float64)) is None  # float64: all far above its round-off
    assert _roundoff_below(etas, np.array([0.12, 0.5, 0.5, 0.5, 0.5]), samples) is None  # only the last eta
    assert _roundoff_below(etas, np.full(5, 1e-7), samples) == 1e-2
    assert _roundoff_below(etas, np.full(5, np.nan), samples) is None


def test_field_plot_of_an_all_zero_field_divides_nothing_by_zero():
    """g_t = 0 everywhere (every weight underflowed): no arrow, no RuntimeWarning."""
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)), -1).reshape(-1, 2).astype(np.float32)
    fields = np.zeros((2, 25, 2), np.float32)
    fields[1, 3] = [1e-30, 0.0]  # one tiny non-zero vector: float32 norms, log of it, unit direction
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = synthetic.score_sensitivity_field(grid, fields, [0.5, 0.9], grid, np.zeros(2, np.float32))
        fig.canvas.draw()
    panels = fig.axes[:2]  # then their colour bars
    quivers = [ax.collections[1] for ax in panels]
    assert not np.any(quivers[0].U) and np.ma.getmaskarray(quivers[0].get_array()).all()
    assert quivers[1].U[3] == 1.0 and quivers[1].get_array()[3] == pytest.approx(-30)
    assert panels[0].get_title().endswith("(zero)") and not panels[1].get_title().endswith("(zero)")
    plt.close("all")


def test_toy2d_with_every_weight_underflowing_counts_them_and_warns_once(tmp_path):
    """nu at (1e4, 1e4): every nu_t/rho_t underflows, in float32 (and float64). Counts by hand:
    8 paths x 20 Euler steps (0.999 / 0.05, rounded) = 160 along the paths, plus 3 field times
    x 5 x 5 grid points = 75 for Fig. 1; stderr is the one warning line, nothing else."""
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "diffsens_cli", "run", "experiment=toy2d", "perturbation.mean=[1e4,1e4]",
         "perturbation.std=1e-3", "solver.dtype=float32", "solver.step_size=0.05", "toy2d.num_paths=8",
         "toy2d.grid_size=5", "dataset.num_points=50", "solver.record_every=5", "solver.progress=false",
         f"hydra.run.dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = ("psi is identically zero: all 160 weights nu/rho underflowed in float32; "
            "use solver.dtype=float64 or a perturbation nearer the data")
    assert r.stderr == f"diffsens: warning: {line}\n"
    summary = strict_loads(Path(out / "summary.json").read_text())
    assert summary["weights"] == {"evaluated": 235, "clamped_low": 0, "clamped_high": 0, "nonfinite": 0,
                                  "underflow": 235, "overflow": 0}
    assert summary["warnings"] == [line]
    assert summary["metrics"]["median_abs_psi"] == 0.0
    with np.load(out / "arrays.npz") as arrays:
        assert not arrays["psi"].any() and not arrays["field_g"].any()


def test_progress_in_a_log_file_is_a_few_plain_lines(monkeypatch, capsys):
    """Where stderr is not a terminal, a bar writes one line per interval, never carriage
    returns (a redrawn bar floods cluster and CI logs)."""
    import time

    from diffsens_cli import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.1)
    for _ in progress.bar(range(20), desc="integrate", leave=False):
        time.sleep(0.02)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= 8, lines
    assert lines[-1].startswith("integrate: 100%") and "20/20" in lines[-1]
    for _ in progress.bar(range(2), desc="samples"):  # a nested bar: no cursor movements either
        for _ in progress.bar(range(3), desc="inner", leave=False):
            time.sleep(0.05)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "inner: 100%" in err and "samples: 100%" in err, err
    for _ in progress.bar(range(3), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""
