"""dsv3-report's HTML page from a real (tiny, CPU) run: its plots, its numbers, its refusals, and
the page as headless Chromium renders it."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image  # pillow comes with matplotlib, which the test extras install

from megatron_dsv3.cli.report import STARVED_ROWS, main as report_main
from megatron_dsv3.monitor import plots

STEPS = 12
PLOTS = ("Loss and MTP loss", "MTP acceptance per depth", "MaxVio per layer and the maximum", "Expert load per layer (expert x step)",
         "Routing bias per layer (expert x step)", "Starved experts per layer")


class _Page(HTMLParser):
    """Every tag's attributes, the tables as rows of cell texts, and the figure captions."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[list[list[str]]] = []
        self.captions: list[str] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "figcaption":
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        for buf in (self._cell, self._caption):
            if buf is not None:
                buf.append(data)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run on the CPU, every step logged."""
    from megatron_dsv3.train import main

    run = tmp_path_factory.mktemp("report_run")
    code = main([f"train.steps={STEPS}", "logging.interval=1", "train.device=cpu", "train.seq_length=32",
                 "train.micro_batch_size=2", "train.global_batch_size=4", "logging.console=false",
                 f"checkpoint.dir={run / 'checkpoints'}"])
    assert code == 0
    return run


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _render(run: Path, out: Path, *extra: str) -> _Page:
    assert report_main([str(run), "--html", str(out), *extra]) == 0
    return _Page(out.read_text(encoding="utf-8"))


def _png_of(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


def _table(page: _Page, *header: str) -> list[list[str]]:
    """The rows under the table whose header row is `header`."""
    return next(t[1:] for t in page.tables if tuple(t[0]) == header)


def _colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}


def test_html_report_embeds_every_plot_as_a_decodable_png(run_dir, tmp_path):
    page = _render(run_dir, tmp_path / "report.html")
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert page.captions == list(PLOTS)
    assert len(images) == len(PLOTS)
    for attrs in images:
        image = _png_of(attrs["src"])
        assert image.format == "PNG" and image.width > 300 and image.height > 150
        assert len(_colours(image)) > 20, f"{attrs['alt']}: a blank image"
    links = [v for _, attrs in page.tags for k, v in attrs.items() if k in ("src", "href")]
    assert all(v.startswith("data:") for v in links), "the page must not point at other files"


def test_html_numbers_agree_with_the_jsonl(run_dir, tmp_path):
    page = _render(run_dir, tmp_path / "report.html")
    records = _records(run_dir / "metrics.jsonl")
    losses = [r for r in records if "loss" in r]
    assert losses[-1]["step"] == STEPS
    loss_cell = next(attrs for tag, attrs in page.tags if tag == "td" and attrs.get("data-metric") == "loss")
    assert float(loss_cell["data-last"]) == losses[-1]["loss"]
    training = {row[0]: row for row in _table(page, "metric", "first", "last", "last step", "min", "mean")}
    assert training["loss"][2] == f"{losses[-1]['loss']:.4g}"
    assert training["mtp_loss"][2] == f"{losses[-1]['mtp_loss']:.4g}"
    assert training["mtp/acceptance"][2] == f"{losses[-1]['mtp/acceptance']:.4g}"
    assert 0 < losses[-1]["mtp/acceptance"] < 1 and losses[-1]["mtp/loss_d1"] > 0
    vio = {row[0]: row for row in _table(page, "layer", "MaxVio first", "MaxVio last", "MaxVio max")}
    last_load = next(r for r in reversed(records) if "moe/layer_01/max_vio" in r)
    assert vio["layer_01"][2] == f"{last_load['moe/layer_01/max_vio']:.4g}"

    # starved experts, counted here from the raw load arrays
    expected = {}
    for r in records:
        for key, load in r.items():
            if key.endswith("/load") and isinstance(load, list):
                layer = key.split("/")[-2]
                for expert, x in enumerate(load):
                    if x < 0.1 * sum(load) / len(load):
                        expected[layer, str(expert)] = expected.get((layer, str(expert)), 0) + 1
    assert expected, "the tiny run starves some experts; pick a run that does"
    shown = {(row[0], row[1]): int(row[2]) for row in _table(page, "layer", "expert", "steps starved")}
    assert len(shown) == min(len(expected), STARVED_ROWS)
    assert all(expected[k] == v for k, v in shown.items())
    assert min(shown.values()) >= sorted(expected.values(), reverse=True)[len(shown) - 1]


def test_starved_experts_counts_steps_below_the_fraction_of_the_mean_load():
    records = [{"step": 1, "moe/layer_01/load": [0.5, 0.45, 0.04, 0.01]},  # mean 0.25: 0.025 and below
               {"step": 2, "moe/layer_01/load": [0.7, 0.28, 0.01, 0.01]},
               {"step": 3, "moe/layer_02/load": [0.25, 0.25, 0.25, 0.25]}]
    moe_layers = plots.layers(records)
    assert list(moe_layers) == ["layer_01", "layer_02"]
    assert plots.starved_experts(records, moe_layers) == {"layer_01": {2: 1, 3: 2}, "layer_02": {}}
    assert plots.starved_experts(records, moe_layers, fraction=0.5) == {"layer_01": {2: 2, 3: 2}, "layer_02": {}}


def test_truncated_last_line_still_renders(run_dir, tmp_path):
    """A run killed mid-write leaves half a line: it is skipped and said so; the rest renders."""
    text = (run_dir / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text(text.rstrip("\n")[: -len(last) // 2])
    page_text = (torn / "r.html")
    page = _render(torn, page_text)
    assert "skipped 1 malformed line(s)" in page_text.read_text()
    complete = [r for r in _records(run_dir / "metrics.jsonl")[:-1] if "loss" in r]
    loss_cell = next(attrs for tag, attrs in page.tags if tag == "td" and attrs.get("data-metric") == "loss")
    assert float(loss_cell["data-last"]) == complete[-1]["loss"]
    assert page.captions == list(PLOTS)


@pytest.mark.parametrize("setup, message", [
    ("missing", "no metrics file at"),
    ("empty dir", "no metrics file at"),
    ("empty file", "holds no metrics records"),
    ("not jsonl", "none of its 2 line(s) is a JSON object with a step"),
])
def test_refuses_a_missing_or_empty_run_with_exit_2(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "empty file":
        (run / "metrics.jsonl").write_text("")
    if setup == "not jsonl":
        (run / "metrics.jsonl").write_text("hello\n[1, 2]\n")
    out = tmp_path / "r.html"
    assert report_main([str(run), "--html", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(run) in err
    assert not out.exists()


def test_refuses_a_starved_threshold_outside_0_1(run_dir, tmp_path, capsys):
    assert report_main([str(run_dir), "--html", str(tmp_path / "r.html"), "--starved-below", "1.5"]) == 2
    assert "--starved-below must be between 0 and 1, got 1.5" in capsys.readouterr().err


def test_refuses_html_and_markdown_outputs_together(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        report_main([str(run_dir), "--html", str(tmp_path / "r.html"), "--out", str(tmp_path / "r.md")])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_without_matplotlib_the_html_report_is_refused_by_name(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report_main([str(run_dir), "--html", str(tmp_path / "r.html")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


CHROMIUM = shutil.which("chromium")
# Appended to a copy of the page: the title records how many images Chromium decoded.
_IMAGE_PROBE = ("<script>window.addEventListener('load', () => { const i = [...document.images]; "
                "document.title = 'images ' + i.length + ' broken ' + "
                "i.filter(x => !x.complete || x.naturalWidth === 0).length; });</script>")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_headless_chromium_renders_the_page_with_all_its_images(run_dir, tmp_path):
    page = tmp_path / "report.html"
    _render(run_dir, page)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _IMAGE_PROBE + "</body>"))
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"<title>images {len(PLOTS)} broken 0</title>" in dom.stdout

    shot = tmp_path / "screenshot.png"
    run = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1100,3400", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1100, 3400)
    colours = _colours(image)
    assert len(colours) > 200, "the screenshot looks blank"
    assert (0x1F, 0x77, 0xB4) in colours, "the loss curve (matplotlib's first colour) is not on screen"
