"""HTML pages of run directories: each run's ``index.html``, and ``diffsens report``'s page of many runs.

A run's figures, numbers and settings lie in separate files (PNGs, ``summary.json``,
``config.yaml``); a page puts them side by side, with the paper's numbers beside ours, so
a run is judged at a glance.  The report embeds its images, so it still works when
mailed or moved alone.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from diffsens_cli.errors import DiffsensError
from diffsens_cli.stages import atomic_write

SKIP = {"stages", ".hydra", ".submitit", ".set-aside"}  # folders that hold no run directories
MAX_ROWS = 60  # of the numbers table; the rest are in summary.json
MAX_SETTINGS = 200  # rows of the settings table; the rest are in config.yaml
LIST_ITEMS = 4  # shown of a list (per-sample values), then how many there are
SETTINGS = ("seed", "solver", "train")  # the config groups the report shows
MAX_FIGURE_BYTES = 20 * 2**20  # a figure larger than this is listed, not embedded
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_DEPTH = 64  # of a summary.json or config.yaml a page reads (diffsens writes under 10)

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:75em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.n{font-family:monospace}figure{display:inline-block;margin:.5em;vertical-align:top}
img{max-width:36em}code{background:#f4f4f4}.problem{color:#a00}section{border-top:1px solid #888}
figure.t{margin:.2em;width:8em;font-size:70%;overflow-wrap:anywhere}
figure.t img{width:64px;image-rendering:pixelated}"""
# The browser test reads how many images loaded from the body's data-images.
SCRIPT = """window.onload = () => {
  const images = [...document.querySelectorAll("img")];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = loaded + "/" + images.length;
};"""


@dataclass
class Run:
    """A run directory as a page shows it: its summary and config, or why the summary could not be read."""

    path: Path
    name: str  # config.yaml's ``name``, else the folder's
    mtime: float  # of summary.json (of the folder without one): which run of an experiment is newest
    summary: dict[str, Any] | None
    config: dict[str, Any]
    problem: str | None


def load_run(path: Path) -> Run:
    """The run directory ``path``; a missing or unreadable summary.json, or a config.yaml
    that is not plain YAML, is a ``problem``, not an error."""
    config, problem = _read_yaml(path / "config.yaml")
    summary_path = path / "summary.json"
    summary = None
    try:
        summary = _strict_json(summary_path.read_text())
        if not isinstance(summary, dict):
            summary, problem = None, "summary.json is not a JSON object"
    except FileNotFoundError:
        problem = "no summary.json: the run did not finish"
    except (OSError, ValueError, RecursionError) as e:
        problem = f"summary.json is unreadable: {'nested too deep' if isinstance(e, RecursionError) else e}"
    if summary is not None and _depth(summary) > MAX_DEPTH:
        summary, problem = None, f"summary.json is nested deeper than {MAX_DEPTH} levels"
    mtime = (summary_path if summary_path.exists() else path).stat().st_mtime
    return Run(path, str(config.get("name") or path.name), mtime, summary, config, problem)


def _strict_json(text: str) -> Any:
    """JSON as the standard has it: ``NaN`` and ``Infinity`` (which Python writes and reads
    by default) are refused with a ValueError."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _depth(x: Any, limit: int = MAX_DEPTH + 1) -> int:
    """How deep ``x`` nests mappings and lists, counted up to ``limit`` (no recursion)."""
    deepest, todo = 0, [(x, 0)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth < limit and isinstance(item, dict | list):
            todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _read_yaml(path: Path) -> tuple[dict[str, Any], str | None]:
    """A YAML mapping (``{}`` if the file is missing or not a mapping), and why it was
    refused: YAML with aliases (which no diffsens run writes: a recursive one, or a few
    hundred bytes that expand to megabytes) or nested deeper than ``MAX_DEPTH``."""
    try:
        text = path.read_text()
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events: nothing expanded, nothing recursed
            if isinstance(event, yaml.AliasEvent):
                return {}, "config.yaml uses YAML aliases, which diffsens never writes: not read"
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_DEPTH:
                return {}, f"config.yaml is nested deeper than {MAX_DEPTH} levels: not read"
        data = yaml.safe_load(text)
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, yaml.YAMLError) as e:
        return {}, f"config.yaml is unreadable: {' '.join(str(e).split())}"
    return (data if isinstance(data, dict) else {}), None


def find_runs(inputs: list[Path]) -> list[Run]:
    """The run directories under ``inputs``, by experiment name: for each the newest finished
    run, and any newer unfinished or broken ones (the latest attempt failed), newest first."""
    paths = {p.resolve(): p for root in inputs for p in _run_dirs(root)}
    runs = sorted((load_run(p) for p in paths.values()), key=lambda r: (r.name, -r.mtime))
    kept, finished = [], set()
    for run in runs:
        if run.name not in finished:
            kept.append(run)
            if run.summary is not None:
                finished.add(run.name)
    return kept


def _run_dirs(root: Path) -> Iterator[Path]:
    """Folders under ``root`` that hold a summary.json, or a config.yaml beside Hydra's
    ``.hydra`` record (a started run); nothing inside a run directory is searched."""
    for folder, subdirs, names in os.walk(root):
        if "summary.json" in names or ("config.yaml" in names and ".hydra" in subdirs):
            subdirs.clear()
            yield Path(folder)
        else:
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP)


def numbers(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, ours, the paper's) rows, formatted: ``metrics`` flattened to dotted keys, and
    the paper's numbers (``summary["paper"]`` or ``metrics["paper"]``) beside ours where the
    keys match; a paper's number that matches none has a row of its own."""
    metrics = summary.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    ours = _flatten({k: v for k, v in metrics.items() if k != "paper"})
    paper = {**_flatten(summary.get("paper")), **_flatten(metrics.get("paper"))}
    rows, unmatched = [], dict(paper)
    for key, value in ours.items():
        match = _paper_key(key, paper)
        rows.append((key, fmt(value), fmt(paper[match]) if match else ""))
        unmatched.pop(match, None)
    return rows + [(key, "", fmt(value)) for key, value in unmatched.items()]


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}`` (lists are leaves); anything but a mapping is ``{}``."""
    if not isinstance(x, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in x.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _paper_key(key: str, paper: dict[str, Any]) -> str | None:
    """The paper's key for our ``key``: the same key, or its tail, a ``.median`` dropped
    (``influence.r2_l2.median`` is the paper's ``r2_l2``)."""
    stem = key.removesuffix(".median")
    for k in (key, stem):
        if k in paper:
            return k
    return next((p for p in paper if stem.endswith("." + p)), None)


def fmt(x: Any) -> str:
    """A value for a table cell: numbers to 3 significant digits, lists and mappings cut short."""
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, list):
        return _cut([fmt(v) for v in x[:LIST_ITEMS]], len(x), "[]")
    if isinstance(x, dict):
        return _cut([f"{k}: {fmt(v)}" for k, v in list(x.items())[:LIST_ITEMS]], len(x), "{}")
    return str(x)


def _cut(items: list[str], total: int, brackets: str) -> str:
    more = f", … ({total} in all)" if total > len(items) else ""
    return f"{brackets[0]}{', '.join(items)}{more}{brackets[1]}"


def duration(seconds: Any) -> str:
    """``12.3 s``, ``13 min 03 s`` or ``2 h 05 min``; ``?`` for a missing value."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "?"
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes} min {int(seconds) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def figures(run: Run) -> list[Path]:
    """The run's PNG figures: in ``summary["figures"]``'s order when it lists them, else by name."""
    listed = (run.summary or {}).get("figures")
    if isinstance(listed, list) and listed:
        return [run.path / str(n) for n in listed if str(n).endswith(".png")]
    return sorted(run.path.glob("*.png"))


def _shown_name(png: Path, run_dir: Path) -> str:
    """A figure's name as its run lists it: relative to the run directory where it is inside."""
    return png.relative_to(run_dir).as_posix() if png.is_relative_to(run_dir) else str(png)


def _href(path: Path, page_dir: Path) -> str:
    """``path`` as a link from a page in ``page_dir``, escaped for an attribute."""
    return escape(quote(Path(os.path.relpath(path, page_dir)).as_posix()))


def figure_problem(png: Path, run_dir: Path) -> str | None:
    """Why ``png`` is not shown on a page of ``run_dir``, or None: only a regular file
    inside the run directory (its resolved path, so no symlink or ``..`` out of it) that
    starts with the PNG signature, at most ``MAX_FIGURE_BYTES``.  Nothing is opened before
    it is known to be a regular file (a FIFO or a device named ``*.png`` never blocks)."""
    try:
        resolved = png.resolve()
        if not resolved.is_relative_to(run_dir.resolve()):
            return "outside the run directory"
        info = resolved.stat()
    except FileNotFoundError:
        return "missing"
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        return f"unreadable ({e})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_FIGURE_BYTES:
        return f"{info.st_size / 2**20:.1f} MB, over the {MAX_FIGURE_BYTES / 2**20:g} MB cap of a figure"
    try:
        with open(resolved, "rb") as f:
            signature = f.read(len(PNG_SIGNATURE))
    except OSError as e:
        return f"unreadable ({e})"
    return None if signature == PNG_SIGNATURE else "not a PNG file"


def _image_src(png: Path, page_dir: Path, embed: bool) -> str | None:
    """The ``src`` of a figure that passed ``figure_problem``: its bytes as a data URL with
    ``embed``, else a relative link."""
    if not embed:
        return _href(png, page_dir)
    try:
        return "data:image/png;base64," + base64.b64encode(png.resolve().read_bytes()).decode("ascii")
    except OSError:  # gone since it was checked
        return None


def _run_body(run: Run, page_dir: Path, embed: bool) -> str:
    """A finished run's times, command, figures, numbers (with the paper's) and settings."""
    summary = run.summary or {}
    stages = ", ".join(f"{escape(str(k))} {duration(v)}" for k, v in _flatten(summary.get("stage_times_s")).items())
    log = summary.get("stages")
    reused = sorted({str(s.get("stage")) for s in log if isinstance(s, dict) and s.get("reused")}) \
        if isinstance(log, list) else []
    parts = [f"<p>Wall time {duration(summary.get('wall_time_s'))}"
             + (f" (stages: {stages})" if stages else "")
             + (f"; reused from the stage cache: {escape(', '.join(reused))}" if reused else "") + ".</p>"]
    if summary.get("command"):
        parts.append(f"<p>Command: <code>{escape(str(summary['command']))}</code></p>")
    parts += _galleries(run, page_dir, embed)  # what a user asked, first
    for png in figures(run):
        problem = figure_problem(png, run.path)
        if problem is not None:
            parts.append(f'<p class="problem">{escape(_shown_name(png, run.path))}: not shown, {escape(problem)}</p>')
            continue
        src = _image_src(png, page_dir, embed)
        if src is None:
            parts.append(f'<p class="problem">{escape(_shown_name(png, run.path))}: not shown, unreadable</p>')
            continue
        pdf = png.with_suffix(".pdf")
        caption = escape(png.name) + (f' (<a href="{_href(pdf, page_dir)}">PDF</a>)' if pdf.is_file() else "")
        parts.append(f'<figure><img src="{src}" alt="{escape(png.name)}"><figcaption>{caption}</figcaption></figure>')
    rows = numbers(summary)
    if rows:
        parts.append("<table><tr><th>number</th><th>ours</th><th>paper</th></tr>")
        parts += [f'<tr><td>{escape(k)}</td><td class="n">{escape(v)}</td><td class="n">{escape(p)}</td></tr>'
                  for k, v, p in rows[:MAX_ROWS]]
        parts.append("</table>")
        if len(rows) > MAX_ROWS:
            parts.append(f"<p>{len(rows) - MAX_ROWS} more numbers not shown: see summary.json.</p>")
    settings = _flatten({k: run.config[k] for k in SETTINGS if k in run.config})
    if settings:
        parts.append("<details><summary>Settings</summary><table>")
        parts += [f'<tr><td>{escape(k)}</td><td class="n">{escape(fmt(v))}</td></tr>'
                  for k, v in list(settings.items())[:MAX_SETTINGS]]
        parts.append("</table>" + (f"<p>{len(settings) - MAX_SETTINGS} more settings not shown: see config.yaml.</p>"
                                   if len(settings) > MAX_SETTINGS else "") + "</details>")
    return "\n".join(parts)


def _galleries(run: Run, page_dir: Path, embed: bool) -> list[str]:
    """The summary's ``galleries`` (influence runs on images): per model sample or query, its
    image and its most and least influential training images with their names and scores."""
    galleries = (run.summary or {}).get("galleries")
    if not isinstance(galleries, list) or not galleries:
        return []
    parts = ["<h2>Most and least influential training images</h2>",
             "<p>By <code>ours</code>; every training image, ranked, with every method's score: "
             "<code>tables/</code>.</p>"]
    for gallery in galleries:
        if not isinstance(gallery, dict):
            continue
        parts.append(f"<h3>{escape(str(gallery.get('title', '')))}</h3>\n<table>")
        parts.append(f"<tr><th>sample</th><td>{_thumbnail(run, gallery.get('image'), '', page_dir, embed)}</td></tr>")
        for key, label in (("top", "most influential"), ("bottom", "least influential")):
            items = gallery.get(key)
            cells = "".join(_thumbnail(run, item.get("image"),
                                       f"{escape(str(item.get('name', '')))}<br>{escape(fmt(item.get('score')))}",
                                       page_dir, embed, alt=str(item.get("name", "")))
                            for item in (items if isinstance(items, list) else []) if isinstance(item, dict))
            parts.append(f"<tr><th>{label}</th><td>{cells}</td></tr>")
        parts.append("</table>")
    return parts


def _thumbnail(run: Run, image: Any, caption: str, page_dir: Path, embed: bool, alt: str = "") -> str:
    """One thumbnail of a gallery with its caption (HTML, escaped by the caller), or
    why it is not shown; only a PNG inside the run directory is (``figure_problem``)."""
    png = run.path / str(image)
    problem = figure_problem(png, run.path) if isinstance(image, str) else "no image"
    src = _image_src(png, page_dir, embed) if problem is None else None
    shown = f'<img src="{src}" alt="{escape(alt)}">' if src else \
        f'<span class="problem">not shown: {escape(problem or "unreadable")}</span>'
    return f'<figure class="t">{shown}<figcaption>{caption}</figcaption></figure>'


def _title(run: Run) -> str:
    task = run.config.get("task")
    return escape(run.name + (f" ({task})" if task else ""))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>\n{SCRIPT}\n</script>\n</body></html>\n")


def _body_or_problem(run: Run, page_dir: Path, embed: bool) -> str:
    """The run's body, or the one line saying why it has none."""
    return _run_body(run, page_dir, embed) if run.problem is None else f'<p class="problem">{escape(run.problem)}</p>'


def write_run_index(run_dir: Path) -> Path:
    """Write ``<run_dir>/index.html``: the run's figures (linked, not embedded), headline
    numbers beside the paper's, times, command and settings."""
    run = load_run(Path(run_dir))
    body = f"<h1>{_title(run)}</h1>\n" + _body_or_problem(run, run.path, embed=False)
    path = run.path / "index.html"
    text = _page(run.name, body)
    atomic_write(path, lambda f: f.write(text), "w")
    return path


def write_report(inputs: list[Path], out: Path) -> Path:
    """Write ``out/index.html``, one self-contained page of the newest run of each experiment
    under ``inputs``; raises a DiffsensError for a missing input folder or no run directory."""
    for folder in inputs:
        if not Path(folder).is_dir():
            raise DiffsensError(f"{folder}: no such folder")
    runs = find_runs([Path(p) for p in inputs])
    if not runs:
        raise DiffsensError(f"no run directories (folders holding summary.json) under {', '.join(map(str, inputs))}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffsensError(f"--out {out}: not a folder")
    total = sum(w for r in runs if isinstance(w := (r.summary or {}).get("wall_time_s"), int | float))
    broken = sum(r.problem is not None for r in runs)
    head = [f"<h1>diffsens report</h1>\n<p>Generated {escape(time.strftime('%Y-%m-%d %H:%M %Z'))}: {len(runs)} "
            f"runs{f' ({broken} not finished or unreadable)' if broken else ''} under "
            f"{escape(', '.join(map(str, inputs)))}; total wall time {duration(total)}.</p>\n<ul>"]
    sections = []
    for i, run in enumerate(runs):
        folder = _href(run.path, out)
        head.append(f'<li><a href="#run-{i}">{_title(run)}</a> <code>{escape(str(run.path))}</code>'
                    + (f' <span class="problem">{escape(run.problem)}</span>' if run.problem else "") + "</li>")
        links = f'Run directory <a href="{folder}/"><code>{escape(str(run.path))}</code></a>'
        if (run.path / "index.html").is_file():
            links += f' (<a href="{folder}/index.html">its page</a>)'
        body = _body_or_problem(run, out, embed=True)
        sections.append(f'<section id="run-{i}"><h2>{_title(run)}</h2>\n<p>{links}</p>\n{body}\n</section>')
    head.append("</ul>")
    path = out / "index.html"
    text = _page("diffsens report", "\n".join(head + sections))
    try:
        atomic_write(path, lambda f: f.write(text), "w")
    except OSError as e:
        raise DiffsensError(f"--out {out}: cannot write {path.name} there ({e.strerror or e})") from None
    return path
