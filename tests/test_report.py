from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

# shared synthetic sweep (2 runs x steps 0/10/20 x 4 layers); tests/ is on sys.path under pytest's default import mode
from test_plots import SUMMARY, synthetic_frames

from refusal_probe.analysis import plots
from refusal_probe.analysis.correlate import correlate, per_layer_correlation
from refusal_probe.analysis.paths import path_scrubber
from refusal_probe.analysis.report import CSP, fmt, write_report
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
    assert "[SVG](figures/behaviour.svg)" in text and "[SVG](figure1_refusal_vs_chrf.svg)" in text
    pngs = list(out.glob("figures/*.png")) + list(out.glob("figure[12]_*.png"))
    assert pngs  # the loop below checks something
    for png in pngs:
        assert f"({png.relative_to(out).as_posix()})" in text


def test_report_says_how_things_were_measured(analysis):
    _, md, _, corr = analysis
    text = md.read_text()
    assert "keywords:47|case:insensitive" in text and "nrefs:1|case:mixed" in text  # signatures verbatim
    assert "| tiny-llama | 2 | -1 |" in text  # base, refusal layer, position
    assert "- `tiny-llama`: layer 2, position -1" in text.split("## Findings")[0]  # said before the findings
    assert "harmful_train" in text and "32" in text
    assert "delta_fro_total: ||W_ckpt - W_base||_F" in text  # every column has its definition
    assert "mean_cos_to_base: cos_to_base averaged over all layers" in text
    assert "the base once per distinct base" in text  # how the correlations were computed
    assert "checkpoint-10" in text  # metadata provenance
    # the strongest correlation: all 5 distinct checkpoints in perfect rank order, exact p = 2 / 5!
    row = corr[(corr["x"] == "cos_to_base_at_rl") & (corr["y"] == "refusal_rate") & (corr["group"] == "all")]
    assert len(row) >= 1 and row.iloc[0]["n"] == 5 and row.iloc[0]["spearman_p"] == pytest.approx(2 / 120)
    assert "| cos_to_base_at_rl | refusal_rate | all | 5 | 2 | 1 |" in text  # x, y, group, n, n_runs, rho
    assert "tracks the refusal rate best" in text


def test_sections_in_order_findings_first_provenance_folded_last(analysis):
    _, md, _, _ = analysis
    text = md.read_text()
    order = [
        "## Findings",
        "### Which runs lost refusal",
        "### Strongest internal correlate of refusal",
        "### LoRA vs full fine-tuning",
        "### Predicting refusal without generating",
        "## Figure 1: refusal vs chrF",
        "## Figure 2: over training",
        "## Direction drift by layer",
        "## Layer x step heatmap",
        "## Weight-delta profiles",
        "## Causal drift",
        "## LoRA vs full fine-tuning",
        "## Correlations with intervals",
        "## Behaviour: label breakdown",
        "## Every checkpoint",
        "<details><summary>Provenance",
        "## Provenance",
    ]
    at = [text.index("\n" + h) for h in order]
    assert at == sorted(at)
    assert text.rstrip().endswith("</details>")
    # inputs this analysis lacks are said, not silently dropped
    assert "Not available: no prediction.json in this analysis." in text
    assert "## Causal drift\n\nNot available: no causal measures were recorded." in text
    assert "## Weight-delta profiles\n\nNot available: no weight-delta figure" in text  # not drawn here
    # findings state their numbers: full 0.8 -> 0.4 refusal, n unknown from these signatures
    assert "`full-lr5e-05` (full, lr 5e-05), 80% -> 40%" in text


def test_html_matches_markdown_and_embeds_every_png(analysis):
    out, md, table, _ = analysis
    page = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    pngs = re.findall(r"\]\(([^)]+\.png)\)", md.read_text())
    assert len(pngs) == 4  # drift, behaviour, Figures 1 and 2
    assert len(parser.imgs) == len(pngs)
    for src, rel in zip(parser.imgs, pngs, strict=True):  # same figures, same order, bytes embedded
        assert src == "data:image/png;base64," + base64.b64encode((out / rel).read_bytes()).decode()
    assert parser.links == []  # nothing to follow out of the file
    assert parser.rows >= len(table) + 1
    assert "<code>refusal-probe eval</code>" in page  # inline code survives into the html
    assert page.startswith("<!DOCTYPE html>")
    assert f'content="{CSP}"' in page and "default-src 'none'" in CSP and "img-src data:" in CSP


def test_report_without_behaviour_or_figures(tmp_path):
    drift, deltas, _ = synthetic_frames()
    table = checkpoint_table(drift, deltas, None, 2)
    md = write_report(tmp_path, {}, table, correlate(table), [])
    text = md.read_text()
    assert "Not available: no behaviour to correlate with" in text
    assert "Not available: no refusal rates" in text
    assert "## Figure 1: refusal vs chrF\n\nNot available: needs refusal rates" in text
    assert not list(tmp_path.glob("figure*"))
    assert "| lora-lr5e-05 | step-10 | lora | 5e-05 | 10 |" in text
    assert (tmp_path / "report.html").exists()
    # the html is well-formed enough for an XML parser once the doctype is dropped
    ET.fromstring((tmp_path / "report.html").read_text().split("\n", 1)[1])


def test_stale_study_figures_are_removed(tmp_path):
    drift, deltas, beh = synthetic_frames()
    write_report(tmp_path, {}, checkpoint_table(drift, deltas, beh, 2), None, [])
    assert (tmp_path / "figure1_refusal_vs_chrf.png").is_file()
    write_report(tmp_path, {}, checkpoint_table(drift, deltas, None, 2), None, [])  # behaviour gone
    assert not list(tmp_path.glob("figure*"))


def test_absolute_paths_are_shown_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_PROBE_CACHE", "/var/cache/rp")
    root = tmp_path / "tree"
    summary = {"tree": {"root": str(root), "spec": str(root)}}
    scrub = path_scrubber(summary, root / "analysis")
    assert scrub(f"{root}/full-lr1e-4/checkpoint-2") == "full-lr1e-4/checkpoint-2"
    assert scrub(f"spec {root}") == "spec ."
    assert scrub("/var/cache/rp/directions/abc123/direction.pt") == "<cache>/directions/abc123/direction.pt"
    assert scrub(str(Path.home() / "models" / "x")) == "~/models/x"
    assert scrub("base=/opt/models/qwen, n=3") == "base=.../models/qwen, n=3"
    # the analysis folder inside the tree reads relative to the tree; outside it, as <analysis>
    assert scrub(f"{root}/analysis/cache/base/m-1") == "analysis/cache/base/m-1"
    assert path_scrubber(summary, tmp_path / "out")(f"{tmp_path}/out/cache/x") == "<analysis>/cache/x"
    # not paths: ratios, flags, URLs, formulae
    for text in (
        "step / last step",
        "--shard 0/2",
        "harmful/harmless",
        "https://example.com/a/b",
        "W_ckpt - W_base",
    ):
        assert scrub(text) == text
    out = tmp_path / "elsewhere" / "analysis"
    summary["bases"] = {"m": {"refusal_layer": 1, "direction_files": "/var/cache/rp/directions/k"}}
    summary["checkpoints"] = [{"run": "r", "path": f"{root}/r/checkpoint-1"}]
    md = write_report(out, summary, None, None, []).read_text()
    assert "<cache>/directions/k" in md and "| r | r/checkpoint-1 |" in md
    assert str(tmp_path) not in md and str(tmp_path) not in (out / "report.html").read_text()


def test_report_command_from_tables_alone(tmp_path, capsys):
    """`refusal-probe report DIR` on tables and a summary.json (no model anywhere): in place, twice the same bytes;
    with --out, the figures are copied beside it and the tables are named where they are."""
    from refusal_probe.cli import main
    from refusal_probe.core.io import write_json

    folder = tmp_path / "analysis"
    drift, deltas, beh = synthetic_frames()
    table = checkpoint_table(drift, deltas, beh, 2)
    figs = plots.plot_drift_by_layer(drift, folder, summary=SUMMARY)
    for name, df in (
        ("checkpoints", table),
        ("correlations", correlate(table)),
        ("behaviour", beh),
        ("drift", drift),
    ):
        df.to_csv(folder / f"{name}.csv", index=False)
    write_json(
        folder / "summary.json",
        {**SUMMARY, "format": "refusal-probe/analysis/1", "figures": [f.name for f in figs]},
    )
    assert main(["report", str(folder)]) == 0
    assert "report written to" in capsys.readouterr().out
    first = {
        n: (folder / n).read_bytes() for n in ("report.md", "report.html", "figure1_refusal_vs_chrf.svg")
    }
    assert main(["report", str(folder)]) == 0
    assert {n: (folder / n).read_bytes() for n in first} == first  # deterministic
    text = first["report.md"].decode()
    assert "`full-lr5e-05` (full, lr 5e-05), 80% -> 40%" in text and "tables beside this report" in text
    out = tmp_path / "elsewhere"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "The tables in `../analysis`" in md
    assert (out / "drift_cos_to_base_by_layer.png").is_file() and (
        out / "figure2_over_checkpoints.svg"
    ).is_file()
    assert "(drift_cos_to_base_by_layer.png)" in md


def test_fmt():
    assert fmt(5e-05) == "5e-05" and fmt(0.123456) == "0.1235" and fmt(20) == "20" and fmt(1.0) == "1"
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(pd.NA) == "n/a"
    assert fmt(0.000123456, p=True) == "0.00012"
