from __future__ import annotations

import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pandas as pd
import pytest

# shared synthetic sweep (2 runs x steps 0/10/20 x 4 layers); tests/ is on sys.path under pytest's default import mode
from test_plots import SUMMARY, synthetic_frames

from refusal_probe.analysis import plots
from refusal_probe.analysis.correlate import correlate, per_layer_correlation
from refusal_probe.analysis.report import fmt, write_report
from refusal_probe.analysis.tables import checkpoint_table


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.rows = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "tr":
            self.rows += 1


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    drift, deltas, beh = synthetic_frames()
    table = checkpoint_table(drift, deltas, beh, 2)
    corr = correlate(table)
    per_layer = per_layer_correlation(drift, beh)
    figs = plots.plot_drift_by_layer(drift, out / "figures", summary=SUMMARY)
    figs += plots.plot_behaviour(beh, table, out / "figures", summary=SUMMARY)
    summary = {
        **SUMMARY,
        "checkpoints": [{"run": "full-lr5e-05", "checkpoint": "checkpoint-10", "lr": "run.json"}],
    }
    md = write_report(out, summary, table, corr, figs, per_layer=per_layer)
    return out, md, table, corr


def test_report_has_table_rows_and_figures(analysis):
    out, md, table, _ = analysis
    assert md == out / "report.md"
    text = md.read_text()
    # one table row per checkpoint, with its numbers as the report formats them
    for row in table.itertuples():
        line = f"| {row.run} | {row.checkpoint} | {row.method} | {fmt(row.lr)} | {row.step} | {fmt(row.fraction)} |"
        assert line in text, line
    assert (
        "| full-lr5e-05 | step-20 | full | 5e-05 | 20 | 1 | 2 | 0.7 |" in text
    )  # cos at layer 2: 1 - 0.4 * 1 * 3/4
    assert "![Direction drift by layer](figures/drift_cos_to_base_by_layer.png)" in text
    assert "[SVG](figures/behaviour.svg)" in text
    pngs = list(out.glob("figures/*.png"))
    assert pngs  # the loop below checks something
    for png in pngs:
        assert f"({png.relative_to(out).as_posix()})" in text


def test_report_says_how_things_were_measured(analysis):
    _, md, _, corr = analysis
    text = md.read_text()
    assert "keywords:47|case:insensitive" in text and "nrefs:1|case:mixed" in text  # signatures verbatim
    assert "`tiny-llama`: layer 2, position -1" in text
    assert "harmful_train" in text and "32" in text
    assert "delta_fro_total: ||W_ckpt - W_base||_F" in text  # every column has its definition
    assert "mean_cos_to_base: cos_to_base averaged over all layers" in text
    assert "counted once per distinct base" in text and f"uncorrected for the {len(corr)} tests" in text
    assert "exact over all n! pairings when n <= 8" in text
    assert "checkpoint-10" in text  # metadata provenance
    # the strongest correlation: all 5 distinct checkpoints in perfect rank order, exact p = 2 / 5!
    assert "| cos_to_base_at_rl | refusal_rate | all | 5 | 1 | 0.017 |" in text
    assert "tracks the refusal rate best" in text


def test_html_matches_markdown(analysis):
    out, _, table, _ = analysis
    page = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    assert sorted(parser.imgs) == ["figures/behaviour.png", "figures/drift_cos_to_base_by_layer.png"]
    assert all((out / src).exists() for src in parser.imgs + parser.links)
    assert parser.rows >= len(table) + 1
    assert "<code>refusal-probe eval</code>" in page  # inline code survives into the html
    assert page.startswith("<!DOCTYPE html>")


def test_report_without_behaviour_or_figures(tmp_path):
    drift, deltas, _ = synthetic_frames()
    table = checkpoint_table(drift, deltas, None, 2)
    md = write_report(tmp_path, {}, table, correlate(table), [])
    text = md.read_text()
    assert "No behaviour measurements" in text and "No figures were drawn." in text
    assert "| lora-lr5e-05 | step-10 | lora | 5e-05 | 10 |" in text
    assert (tmp_path / "report.html").exists()
    # the html is well-formed enough for an XML parser once the doctype is dropped
    ET.fromstring((tmp_path / "report.html").read_text().split("\n", 1)[1])


def test_fmt():
    assert fmt(5e-05) == "5e-05" and fmt(0.123456) == "0.1235" and fmt(20) == "20" and fmt(1.0) == "1"
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(pd.NA) == "n/a"
    assert fmt(0.000123456, p=True) == "0.00012"
