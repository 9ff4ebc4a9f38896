"""The HTML pages of run directories: each run's index.html and ``diffsens report``'s
self-contained page, read back from run directories written by hand (no runs, no torch work)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from helpers import diffsens

from diffsens_cli.report import write_report, write_run_index
from diffsens_cli.rundir import RunDir
from diffsens_cli.stages import StageCache


class Page(HTMLParser):
    """What a test reads of a page: image sources, links, table rows (their cells' text), all text, body attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self.body: dict[str, str | None] = {}
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "body":
            self.body = a

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, key: str) -> list[str]:
        (found,) = [r for r in self.rows if r and r[0] == key]
        return found


def make_run(path: Path, name: str, summary: dict | str, figures: dict[str, int] | None = None,
             age_s: float = 0) -> Path:
    """A run directory: config.yaml naming the experiment, summary.json (a string is written as it is),
    PNG figures (name -> seed of their random pixels) each with a PDF, summary.json ``age_s`` seconds old."""
    path.mkdir(parents=True)
    config = {"name": name, "task": "predict_change", "seed": 3, "solver": {"method": "ode", "step_size": 0.001}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    for fig, seed in (figures or {}).items():
        plt.imsave(path / fig, np.random.default_rng(seed).random((6, 9, 3)))
        (path / fig).with_suffix(".pdf").write_bytes(b"%PDF-1.4\n")
    (path / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    stamp = (path / "summary.json").stat().st_mtime - age_s
    os.utime(path / "summary.json", (stamp, stamp))
    return path


TYPOGRAPHY = {  # the shape of a predict_change run's summary, the paper's numbers at the top level
    "metrics": {"retrain": {"median_corr": 0.20290548958133678, "num_samples": 256},
                "finetune": {"median_corr": 0.4216671569961845, "fraction_ours_better": 0.1875}},
    "paper": {"retrain": {"median_corr": 0.31}, "finetune": {"median_corr": 0.51}},
    "figures": ["fig7_changes.png", "fig7_changes.pdf", "fig5_correlations.png", "fig5_correlations.pdf"],
    "wall_time_s": 782.901, "stage_times_s": {"sensitivity": 400.5, "samples_retrain": 61.25},
    "stages": [{"stage": "train_base", "reused": True}, {"stage": "sensitivity", "reused": False}],
    "command": "diffsens run experiment=digits_typography <b>seed=3</b>",
}
INFLUENCE = {  # an influence run's: the paper's numbers under metrics.paper, no figures list
    "metrics": {"influence": {"r2_l2": {"per_sample": [0.6711549, 0.3637971, 0.1842993, 0.2363202, 0.2193342,
                                                        0.4021458, 0.1319746, 0.3717964], "median": 0.30005865},
                              "top10_variance": {"median": 0.9472205}, "method": "sketch", "exact": True},
                "paper": {"r2_l2": [0.8, 0.91], "top10_variance": 0.93, "spearman": 0.5}},
    "wall_time_s": 269.611, "command": "diffsens run experiment=digits_influence",
}


@pytest.fixture
def runs(tmp_path) -> Path:
    """tmp_path/outputs: two runs of digits_typography (the older with other figures),
    one of digits_influence, one with a broken summary.json, one unfinished and a stage
    cache holding a summary.json that is no run's."""
    root = tmp_path / "outputs"
    make_run(root / "digits_typography" / "old", "digits_typography", {**TYPOGRAPHY, "wall_time_s": 5.0},
             {"fig7_changes.png": 10, "fig5_correlations.png": 11}, age_s=3600)
    make_run(root / "digits_typography" / "new", "digits_typography", TYPOGRAPHY,
             {"fig7_changes.png": 1, "fig5_correlations.png": 2})
    make_run(root / "digits_influence" / "run1", "digits_influence", INFLUENCE,
             {"fig9_residual.png": 3, "fig10_rays.png": 4})
    make_run(root / "toy2d" / "broken", "toy2d", '{"metrics": {"a": 1')
    unfinished = root / "gmm" / "stopped"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("name: gmm_first_order\n")
    make_run(root / "stages" / "sensitivity" / "abc", "a_stage", INFLUENCE)
    return root


def test_run_index_shows_the_figures_in_order_and_the_numbers_beside_the_papers(runs):
    run = runs / "digits_typography" / "new"
    path = write_run_index(run)
    assert path == run / "index.html"
    text = path.read_text()
    page = Page(text)
    assert page.images == ["fig7_changes.png", "fig5_correlations.png"]  # summary.json's order, by relative path
    assert {"fig7_changes.pdf", "fig5_correlations.pdf"} <= set(page.links)
    assert page.row("retrain.median_corr") == ["retrain.median_corr", "0.203", "0.31"]
    assert page.row("finetune.median_corr") == ["finetune.median_corr", "0.422", "0.51"]
    assert page.row("retrain.num_samples") == ["retrain.num_samples", "256", ""]
    assert page.row("finetune.fraction_ours_better") == ["finetune.fraction_ours_better", "0.188", ""]
    words = "".join(page.text)
    assert "Wall time 13 min 02 s (stages: sensitivity 6 min 40 s, samples_retrain 1 min 01 s)" in words
    assert "reused from the stage cache: train_base." in words
    assert "diffsens run experiment=digits_typography <b>seed=3</b>" in words  # as text, escaped in the HTML
    assert "<b>" not in text and "&lt;b&gt;seed=3&lt;/b&gt;" in text
    assert page.row("solver.step_size") == ["solver.step_size", "0.001"] and page.row("seed") == ["seed", "3"]


def test_run_index_matches_the_papers_numbers_inside_metrics_and_cuts_lists_short(runs):
    run = runs / "digits_influence" / "run1"
    page = Page(write_run_index(run).read_text())
    assert page.images == ["fig10_rays.png", "fig9_residual.png"]  # no figures list: by name
    assert page.row("influence.r2_l2.median") == ["influence.r2_l2.median", "0.3", "[0.8, 0.91]"]
    assert page.row("influence.top10_variance.median") == ["influence.top10_variance.median", "0.947", "0.93"]
    assert page.row("influence.r2_l2.per_sample")[1] == "[0.671, 0.364, 0.184, 0.236, … (8 in all)]"
    assert page.row("influence.method")[1:] == ["sketch", ""] and page.row("influence.exact")[1] == "true"
    assert page.row("spearman") == ["spearman", "", "0.5"]  # the paper's, none of ours
    assert not [r for r in page.rows if r[0].startswith("paper.")]


def test_run_index_caps_the_numbers_table(tmp_path):
    summary = {"metrics": {f"m{i:03d}": i + 0.5 for i in range(75)}, "wall_time_s": 1.25}
    page = Page(write_run_index(make_run(tmp_path / "run", "many", summary)).read_text())
    assert [r[0] for r in page.rows if r[0].startswith("m")] == [f"m{i:03d}" for i in range(60)]
    assert page.row("m059") == ["m059", "59.5", ""]
    assert "15 more numbers not shown: see summary.json." in "".join(page.text)
    assert "Wall time 1.25 s" in "".join(page.text)


def test_write_summary_writes_the_runs_index(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_summary({"retrain": {"median_corr": 0.123456}}, paper={"retrain": {"median_corr": 0.31}})
    page = Page((tmp_path / "run" / "index.html").read_text())
    assert page.row("retrain.median_corr") == ["retrain.median_corr", "0.123", "0.31"]


def test_report_embeds_every_figure_of_the_newest_run_of_each_experiment(runs, tmp_path):
    out = tmp_path / "site" / "report"
    path = write_report([runs], out)
    assert path == out / "index.html"
    text = path.read_text()
    page = Page(text)
    shown = [runs / "digits_influence" / "run1" / f for f in ("fig10_rays.png", "fig9_residual.png")] + \
        [runs / "digits_typography" / "new" / f for f in ("fig7_changes.png", "fig5_correlations.png")]
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.images)
    assert [base64.b64decode(src.removeprefix(prefix)) for src in page.images] == [p.read_bytes() for p in shown]
    old = runs / "digits_typography" / "old"
    assert str(old) not in text and base64.b64encode((old / "fig7_changes.png").read_bytes()).decode() not in text
    words = "".join(page.text)
    assert "a_stage" not in words  # the stage cache holds no runs
    assert f"{runs / 'toy2d' / 'broken'} summary.json is unreadable: " in words
    assert f"{runs / 'gmm' / 'stopped'} no summary.json: the run did not finish" in words
    assert "4 runs (2 not finished or unreadable)" in words
    assert "total wall time 17 min 32 s" in words  # 782.901 + 269.611 s: the old run's 5 s not counted
    assert page.row("retrain.median_corr") == ["retrain.median_corr", "0.203", "0.31"]
    assert page.row("influence.r2_l2.median") == ["influence.r2_l2.median", "0.3", "[0.8, 0.91]"]
    new = runs / "digits_typography" / "new"
    assert os.path.relpath(new, out) + "/" in page.links and os.path.relpath(new, out) + "/index.html" not in page.links
    assert "#run-0" in page.links and "#run-3" in page.links
    write_run_index(new)
    assert os.path.relpath(new, out) + "/index.html" in Page(write_report([runs], out).read_text()).links


def test_the_report_embeds_only_png_files_inside_the_run_and_lists_the_rest_with_why(tmp_path, monkeypatch):
    """A summary listing an absolute path, a ``..`` path, a symlink out of the run, a FIFO,
    a device, a file that is no PNG and one over the size cap: none is embedded (nor
    opened, for the FIFO and the device), each is one line saying why; a PNG in the run,
    also through a symlink inside it, is embedded."""
    import diffsens_cli.report as report

    secret = tmp_path / "secret.png"
    plt.imsave(secret, np.zeros((2, 2, 3)))
    run = make_run(tmp_path / "outputs" / "r", "r", {}, {"fig_ok.png": 1})
    plt.imsave(run / "big.png", np.random.default_rng(2).random((60, 90, 3)))
    (run / "leak.png").symlink_to(secret)
    (run / "alias.png").symlink_to(run / "fig_ok.png")
    os.mkfifo(run / "fifo.png")
    (run / "zero.png").symlink_to("/dev/zero")
    (run / "text.png").write_text("not an image")
    listed = [str(secret), "../../secret.png", "leak.png", "fifo.png", "zero.png", "text.png", "big.png",
              "fig_ok.png", "alias.png"]
    (run / "summary.json").write_text(json.dumps({"metrics": {}, "figures": listed}))
    cap = (run / "fig_ok.png").stat().st_size
    monkeypatch.setattr(report, "MAX_FIGURE_BYTES", cap)
    page = Page(write_report([tmp_path / "outputs"], tmp_path / "rep").read_text())
    ok = base64.b64encode((run / "fig_ok.png").read_bytes()).decode()
    assert page.images == [f"data:image/png;base64,{ok}"] * 2
    assert base64.b64encode(secret.read_bytes()).decode() not in "".join(page.images)
    words = [t for t in page.text if "not shown" in t]
    assert words == [f"{secret}: not shown, outside the run directory", "../../secret.png: not shown, outside the run "
                     "directory", "leak.png: not shown, outside the run directory",
                     "fifo.png: not shown, not a regular file", "zero.png: not shown, outside the run directory",
                     "text.png: not shown, not a PNG file", f"big.png: not shown, "
                     f"{(run / 'big.png').stat().st_size / 2**20:.1f} MB, over the {cap / 2**20:g} MB cap of a figure"]
    assert report.figure_problem(Path("/dev/zero"), Path("/dev")) == "not a regular file"


def test_a_gallery_shows_each_samples_top_and_bottom_training_images_with_their_names(tmp_path):
    """An influence run's ``galleries``: the sample, then its most and least influential
    training images, each with its file name (escaped) and score; a thumbnail outside the
    run is not shown, and says why; entries of the wrong type are passed over."""
    run = make_run(tmp_path / "r", "r", {})
    rd = RunDir(run, StageCache(tmp_path / "stages"))
    image = np.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)
    thumb = rd.save_image("gallery/sample_0/top_1", image)
    galleries = [{"title": "sample_0", "image": rd.save_image("gallery/sample_0/sample", image),
                  "top": [{"image": thumb, "name": "dogs/<b>rex</b>.png", "score": 3.25}],
                  "bottom": [{"image": "../secret.png", "name": "cats/tom.png", "score": 0.5}, "junk"]}, 7]
    (run / "summary.json").write_text(json.dumps({"metrics": {}, "galleries": galleries}))
    page = Page(write_run_index(run).read_text())
    assert page.row("most influential") == ["most influential", "dogs/<b>rex</b>.png3.25"]
    assert page.row("least influential") == ["least influential", "not shown: outside the run directorycats/tom.png0.5"]
    assert page.images == ["gallery/sample_0/sample.png", "gallery/sample_0/top_1.png"]
    assert "<b>rex" not in (run / "index.html").read_text()  # the name is text, not markup
    # the thumbnail is the image, each pixel enlarged 16 times (4 -> 64), 0..255
    from PIL import Image

    pixels = np.asarray(Image.open(run / thumb))
    assert pixels.shape == (64, 64, 3)
    expected = np.round((image.transpose(1, 2, 0) + 1) / 2 * 255).astype(np.uint8)
    assert (pixels[::16, ::16] == expected).all() and (pixels[15::16, 15::16] == expected).all()


@pytest.mark.parametrize("case,summary,config,why", [
    ("nan", '{"metrics": {"a": NaN}}', None, "summary.json is unreadable: NaN is not JSON"),
    ("infinity", '{"metrics": {"a": -Infinity}}', None, "summary.json is unreadable: -Infinity is not JSON"),
    ("deep", '{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "summary.json is unreadable: nested too deep"),
    ("deep_loadable", '{"m": ' + "[" * 200 + "]" * 200 + "}", None, "summary.json is nested deeper than 64 levels"),
    ("recursive_alias", "{}", "name: r\nsolver: &a [*a]\n", "config.yaml uses YAML aliases"),
    ("alias_bomb", "{}", "name: r\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nsolver: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     "config.yaml uses YAML aliases"),
    ("bad_yaml", "{}", "name: [r\n", "config.yaml is unreadable: "),
    ("deep_yaml", "{}", "name: r\nsolver: " + "[" * 5000 + "]" * 5000 + "\n", "config.yaml is nested deeper than 64"),
])
def test_one_bad_run_is_one_line_and_the_rest_of_the_report_stands(runs, tmp_path, case, summary, config, why):
    """Non-standard JSON, nesting past any recursion limit, YAML aliases (recursive, or a
    bomb of a few hundred bytes) and broken YAML: the run is listed with one line saying
    why, and every other run is on the page as before."""
    bad = make_run(runs / "bad" / case, "bad", summary)
    if config is not None:
        (bad / "config.yaml").write_text(config)
    text = write_report([runs], tmp_path / "rep").read_text()
    page = Page(text)
    assert f"{bad} {why}" in "".join(page.text)
    assert len(page.images) == 4 and page.row("retrain.median_corr") == ["retrain.median_corr", "0.203", "0.31"]
    assert len(text) < 100_000


def test_report_out_that_is_a_file_is_one_line(runs, tmp_path):
    (tmp_path / "taken").write_text("x")
    r = diffsens("report", str(runs), "--out", "taken", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "diffsens: error: --out taken: not a folder\n")


def test_report_command(runs, tmp_path):
    r = diffsens("report", str(runs), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{tmp_path / 'rep' / 'index.html'}\n", "")
    assert len(Page((tmp_path / "rep" / "index.html").read_text()).images) == 4

    r = diffsens("report", cwd=tmp_path)  # outputs/ into report/
    assert (r.returncode, r.stdout) == (0, "report/index.html\n") and (tmp_path / "report" / "index.html").is_file()

    r = diffsens("report", str(runs), str(tmp_path / "nowhere"), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, f"diffsens: error: {tmp_path / 'nowhere'}: no such folder\n")
    (tmp_path / "empty").mkdir()
    r = diffsens("report", "empty", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "diffsens: error: no run directories (folders holding summary.json) "
                                           "under empty\n")
    r = diffsens("reprot", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "diffsens: error: unknown command 'reprot'; the commands are: run, train, "
                                           "report\n")


def test_report_images_load_in_a_browser(runs, tmp_path):
    """The page alone, moved away from the runs: Chromium loads every embedded image."""
    if shutil.which("chromium") is None:
        pytest.skip("Chromium not installed (Debian package chromium): "
                    "the report's images are not checked in a browser")
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    shutil.copy(write_report([runs], tmp_path / "report"), moved)
    shutil.rmtree(runs)
    assert loaded_images(moved) == "4/4"
    broken = moved.with_name("broken.html")  # the count tells a broken image: one PNG's bytes cut short
    text = moved.read_text()
    start = text.index("data:image/png;base64,")
    broken.write_text(text[:start + 40] + text[start + 400:])
    assert loaded_images(broken) == "3/4"


def loaded_images(page: Path) -> str | None:
    """The page's ``data-images`` ("loaded/all") once Chromium has loaded it."""
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60, check=True).stdout
    return Page(dom).body.get("data-images")


# -- make figures (experiments/all.sh), with a stand-in diffsens that records its calls --

ALL_SH = Path(__file__).resolve().parents[1] / "experiments" / "all.sh"


def all_sh(*args: str, cwd: Path, script: Path = ALL_SH) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run experiments/all.sh with ``diffsens`` on PATH replaced by a script that records
    each call's arguments (one JSON list per line): what the script asks of diffsens."""
    bin_dir, calls = cwd / "bin", cwd / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "diffsens").write_text(
        f'#!/bin/sh\nexec python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> {calls}\n')
    (bin_dir / "diffsens").chmod(0o755)
    calls.unlink(missing_ok=True)
    r = subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    return r, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_every_experiment_says_its_suite_and_make_figures_takes_them_from_there(tmp_path):
    """One ``# suite: cpu|paper|none`` line per experiment config; a new experiment joins
    ``make figures`` by its own file (here: a copy of toy2d marked cpu, in a copied tree)."""
    configs = ALL_SH.parents[1] / "configs" / "experiment"
    suites = {p.stem: [line for line in p.read_text().splitlines() if line.startswith("# suite:")]
              for p in configs.glob("*.yaml")}
    assert all(len(v) == 1 and v[0] in ("# suite: cpu", "# suite: paper", "# suite: none") for v in suites.values())
    tree = tmp_path / "tree"
    (tree / "experiments").mkdir(parents=True)
    (tree / "experiments" / "all.sh").write_text(ALL_SH.read_text())
    shutil.copytree(configs, tree / "configs" / "experiment")
    (tree / "configs" / "experiment" / "zz_new.yaml").write_text("# @package _global_\n# suite: cpu\n")
    r, calls = all_sh("--cfg", "job", cwd=tmp_path, script=tree / "experiments" / "all.sh")
    listed = calls[0][2].removeprefix("experiment=").split(",")
    assert r.returncode == 0 and listed == sorted(k for k, v in suites.items() if v == ["# suite: cpu"]) + ["zz_new"]


def test_make_figures_runs_one_sweep_then_the_report_and_resumes_an_interrupted_one(tmp_path):
    r, calls = all_sh("size=tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run, report) = calls
    assert run[:2] == ["run", "-m"] and run[4:] == ["hydra.sweep.subdir=${name}", "size=tiny"]
    experiments = run[2].removeprefix("experiment=").split(",")
    assert len(experiments) == 15 and "digits_counterfactual" in experiments and "gtv_naive_sampler" in experiments
    sweep = run[3].removeprefix("hydra.sweep.dir='").removesuffix("'")
    assert sweep.startswith("outputs/figures/cpu/") and report == ["report", sweep, "--out", "report"]

    # interrupted after all but two: those two run again, into the same sweep folder
    for name in experiments:
        (tmp_path / "sweep" / name).mkdir(parents=True)
        if name not in ("gmm_first_order", "digits_counterfactual"):
            (tmp_path / "sweep" / name / "summary.json").write_text("{}")
    r, calls = all_sh("--resume", "sweep", "size=tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert calls == [["run", "-m", "experiment=digits_counterfactual,gmm_first_order", "hydra.sweep.dir='sweep'",
                      "hydra.sweep.subdir=${name}", "size=tiny"], ["report", "sweep", "--out", "report"]]
    for name in ("gmm_first_order", "digits_counterfactual"):
        (tmp_path / "sweep" / name / "summary.json").write_text("{}")
    r, calls = all_sh("--resume", "sweep", cwd=tmp_path)
    assert (r.returncode, calls) == (0, [["report", "sweep", "--out", "report"]])
    assert "every experiment in sweep finished" in r.stdout

    # the paper's list (none of it ran there), options in any order, Hydra's own flags passed on
    r, calls = all_sh("size=tiny", "--resume", "sweep", "--cfg", "job", "--paper", cwd=tmp_path)
    paper = calls[0][2].removeprefix("experiment=").split(",")
    assert r.returncode == 0 and paper == ["celeba_attributes_paper", "celeba_influence", "celeba_oldman",
                                           "gmm_score_error_paper", "mnist_counterfactual", "mnist_tmnist"]
    assert calls[0][3:] == ["hydra.sweep.dir='sweep'", "hydra.sweep.subdir=${name}", "size=tiny", "--cfg", "job"]
    odd = tmp_path / "it's a,b"  # a folder Hydra would split at the comma, unless quoted
    odd.mkdir()
    r, calls = all_sh("--resume", odd.name, cwd=tmp_path)
    assert r.returncode == 0 and calls[0][3] == "hydra.sweep.dir='it\\'s a,b'" and calls[1][1] == odd.name

    (tmp_path / "back\\slash").mkdir()
    for args, message in ((["--resume", "nowhere"], "--resume: 'nowhere' is not a folder"),
                          (["--resume"], "--resume: '' is not a folder"),
                          (["--resume", "back\\slash"], "has a backslash")):
        r, calls = all_sh(*args, cwd=tmp_path)
        assert (r.returncode, calls, r.stderr.count("\n")) == (2, [], 1) and message in r.stderr, args
