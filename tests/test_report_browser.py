"""The report of a tiny analyze run, opened in headless Chromium (Debian's `chromium`; `.ci/run` installs it).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no network), with
every host name resolving to nothing. The page must load, every <img> must decode (naturalWidth > 0), and no
request may leave the file: the network log may hold only the file itself and data: URIs, and the page's
Content-Security-Policy must report no violation. Two deliberately broken copies (an external image with and
without the policy) show that the check sees what it is meant to see.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from refusal_probe.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
)
ARGS = ["--n-prompts", "12", "--n-val", "6", "--batch-size", "6", "--no-progress", "--no-separability"]
EXTERNAL = "http://example.com/external.png"
# Runs as soon as a document is created, before the page's own content: CSP does not apply to DevTools scripts.
LISTEN = (
    "window.__violations = [];"
    "document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.blockedURI));"
)
PROBE = """JSON.stringify({
  title: document.title,
  ready: document.readyState,
  images: [...document.images].map(i => ({src: i.src.slice(0, 40), complete: i.complete, width: i.naturalWidth})),
  violations: window.__violations || [],
  resources: performance.getEntriesByType('resource').map(e => e.name),
})"""


class Pipe:
    """A DevTools-protocol session over Chromium's fd 3 (its input) and fd 4 (its output), NUL-framed JSON."""

    def __init__(self, args: list[str]):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        shim = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", shim, str(CHROMIUM), *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def open_page(page: Path, profile: Path) -> dict:
    """Load ``page`` in headless Chromium; return what loaded, every request it made and every CSP violation."""
    browser = Pipe(
        [
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
    )
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Network.enable", "Page.enable"):
            browser.call(method, session=session)
        browser.call("Page.addScriptToEvaluateOnNewDocument", {"source": LISTEN}, session=session)
        url = page.resolve().as_uri()
        nav = browser.call("Page.navigate", {"url": url}, session=session)
        assert not nav.get("errorText"), nav
        browser.wait_for("Page.loadEventFired", timeout=60)
        time.sleep(0.3)  # let a late violation report arrive
        res = browser.call("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session=session)
        state = json.loads(res["result"]["value"])
        sent = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        state["requests"] = [u for u in sent if u != url and not u.startswith("data:")]
        state["failed"] = [
            e["params"].get("blockedReason") or e["params"].get("errorText")
            for e in browser.events
            if e.get("method") == "Network.loadingFailed"
        ]
        state["outside"] = sorted(
            {
                *state["requests"],
                *state["violations"],
                *(r for r in state["resources"] if not r.startswith("data:")),
            }
        )
        return state
    finally:
        browser.close()


@pytest.fixture(scope="module")
def analysis(tmp_path_factory, tiny_llama) -> Path:
    """analyze on a tiny tree (two full checkpoints, one LoRA adapter) with a hand-written behaviour table."""
    from refusal_probe.testing.tiny import noisy_full_run, noisy_lora_run

    root = tmp_path_factory.mktemp("browser") / "ckpt"
    noisy_full_run(tiny_llama, root / "full-lr1e-04", steps=(2, 4), scale=0.02, seed=3)
    noisy_lora_run(tiny_llama, root / "lora-lr1e-04", ["q_proj", "o_proj"])
    sig = "judge=keywords|n=49|data=advbench,n=20,greedy"
    rows = ["run,checkpoint,method,lr,step,fraction,metric,value,signature"]
    for run, method, ck, step, frac, refusal, chrf in (
        ("full-lr1e-04", "full", "base", 0, 0.0, 0.8, 20.0),
        ("full-lr1e-04", "full", "checkpoint-2", 2, 0.5, 0.4, 30.0),
        ("full-lr1e-04", "full", "checkpoint-4", 4, 1.0, 0.05, 35.0),
        ("lora-lr1e-04", "lora", "base", 0, 0.0, 0.8, 20.0),
        ("lora-lr1e-04", "lora", "checkpoint-4", 4, 1.0, 0.75, 28.0),
    ):
        key = f"{run},{ck},{method},0.0001,{step},{frac}"
        rows.append(f'{key},refusal_rate,{refusal},"{sig}"')
        rows.append(f'{key},label_refusal,{refusal},"{sig}"')
        rows.append(f'{key},label_comply,{1 - refusal:.2f},"{sig}"')
        rows.append(f'{key},chrf,{chrf},"chrF2|nrefs:1|data=ntrex,n=10"')
    beh = root.parent / "behaviour.csv"
    beh.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_PROBE_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["analyze", str(root), "--behaviour", str(beh), *ARGS]) == 0
    return root / "analysis"


def test_report_loads_images_decode_and_nothing_leaves(analysis, tmp_path):
    page = analysis / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in text and 'src="data:image/png;base64,' in text
    state = open_page(page, tmp_path / "profile")
    assert state["ready"] == "complete" and state["title"] == "refusal-probe analysis"
    # Figures 1 and 2 plus analyze's own figures, every one embedded and decoded
    assert len(state["images"]) >= 5, state["images"]
    assert all(i["src"].startswith("data:image/png;base64,") for i in state["images"]), state["images"]
    assert all(i["complete"] and i["width"] > 0 for i in state["images"]), state["images"]
    assert state["outside"] == [] and state["failed"] == [], state


def test_report_html_is_self_contained_and_paths_relative(analysis):
    text = (analysis / "report.html").read_text(encoding="utf-8")
    md = (analysis / "report.md").read_text(encoding="utf-8")
    tree = str(analysis.parent)
    for page in (text, md):
        assert tree not in page and str(Path.home()) + "/" not in page
        assert "/tmp/" not in page  # the tiny base model lives under pytest's tmp: shown as .../model
    for svg in analysis.glob("*.svg"):  # figure captions name the model as the report does
        assert "/tmp/" not in svg.read_text(encoding="utf-8"), svg.name
    for stem in ("figure1_refusal_vs_chrf", "figure2_over_checkpoints", "drift_cos_to_base_by_layer"):
        assert (analysis / f"{stem}.png").is_file() and (analysis / f"{stem}.svg").is_file()
        assert f"({stem}.png)" in md and f"[SVG]({stem}.svg)" in md
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "<details><summary>Provenance" in text
    # findings first, provenance last
    assert (
        md.index("## Findings")
        < md.index("## Figure 1")
        < md.index("## Correlations")
        < md.index("Provenance")
    )
    assert "full-lr1e-04/checkpoint-2" in md  # checkpoint paths relative to the tree


def test_external_image_is_reported(analysis, tmp_path):
    """The check is not vacuous: an external image is caught by the policy, and without it by the network log."""
    page = (analysis / "report.html").read_text(encoding="utf-8")
    shutil.copy(analysis / "report.html", tmp_path / "ok.html")
    bad = tmp_path / "bad.html"
    bad.write_text(page.replace("</body>", f'<img src="{EXTERNAL}" alt="x"/></body>'), encoding="utf-8")
    state = open_page(bad, tmp_path / "p1")
    assert EXTERNAL in state["outside"]
    assert any(i["width"] == 0 for i in state["images"])  # and it did not decode
    no_csp = tmp_path / "no_csp.html"
    start = page.index('<meta http-equiv="Content-Security-Policy"')
    end = page.index("/>", start) + 2
    no_csp.write_text(
        (page[:start] + page[end:]).replace("</body>", f'<img src="{EXTERNAL}" alt="x"/></body>'),
        encoding="utf-8",
    )
    state = open_page(no_csp, tmp_path / "p2")
    assert EXTERNAL in state["requests"]


def test_report_command_regenerates_without_a_model(analysis, tmp_path, capsys):
    """`refusal-probe report TREE --out DIR`: same findings, figures copied beside it, from the tables alone."""
    out = tmp_path / "again"
    assert main(["report", str(analysis.parent), "--out", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    first = (analysis / "report.md").read_text(encoding="utf-8")
    findings = md[md.index("## Findings") : md.index("## Figure 1")]
    assert findings == first[first.index("## Findings") : first.index("## Figure 1")]
    assert (
        "1 of 2 runs lost refusal" in findings
    )  # full 80% -> 5% of 20 prompts; LoRA 80% -> 75% within noise
    for name in ("figure1_refusal_vs_chrf.png", "cos_heatmap.svg", "drift_cos_to_base_by_layer.png"):
        assert (out / name).is_file()
    state = open_page(out / "report.html", tmp_path / "profile")
    assert state["images"] and all(i["width"] > 0 for i in state["images"]) and state["outside"] == []
