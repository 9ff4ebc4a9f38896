"""Paper-sized runs (minutes each): `make test-slow`."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_fig3_at_paper_settings_has_o_eta_remainders(tmp_path):
    """App. F.1.1 settings: with exact densities, median |R|/eta falls like eta for every
    ODE and SDE step size (slope ~1 on the log-log plot); Hutchinson's estimator puts a
    floor under it that shrinks as probes are added."""
    out = tmp_path / "run"
    args = ["experiment=gmm_first_order", f"hydra.run.dir={out}", "solver.progress=false"]
    r = subprocess.run([sys.executable, "-m", "diffsens_cli", "run", *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "summary.json").read_text())["metrics"]
    for key, curve in m.items():
        if key.startswith(("ode/", "sde/")) or key == "hutchinson/exact density":
            assert 0.8 < curve["slope_loglog"] < 1.2, (key, curve["slope_loglog"])
    floor = {k: m[k]["median_remainder_over_eta"]["0.001"] for k in m if "probe" in k}
    assert floor["hutchinson/100 gaussian probes"] < floor["hutchinson/1 gaussian probe"]
    assert min(floor.values()) > m["hutchinson/exact density"]["median_remainder_over_eta"]["0.001"]
