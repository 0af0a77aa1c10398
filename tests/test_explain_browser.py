"""charlm.explain's page in a real browser: headless Chromium loads it offline, the hostile text's
`onerror` never runs, and the DOM after the page's own script holds one element per character."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_explain import HOSTILE, Tags, explain_cfg, write_ckpt

from charlm.explain import explain

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
PWN = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")]


def dump_dom(page) -> str:
    """The DOM after load and scripts, as headless Chromium serialises it."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_hostile_page_in_chromium_runs_nothing_and_shows_every_character(tmp_path):
    text = HOSTILE + PWN + "\n"
    a, b = write_ckpt(tmp_path / "a.ckpt", "lstm"), write_ckpt(tmp_path / "b.ckpt", "transformer")
    explain(explain_cfg(ckpt_path=str(a), against=str(b), text=text, out=str(tmp_path / "o"), device="cpu"))
    dom = dump_dom(tmp_path / "o" / "explain.html")
    assert "<body" in dom and "explain-data" in dom                  # the page loaded and was serialised
    assert not re.search(r"<body[^>]*data-pwned", dom)            # the onerror handler never ran
    parsed = Tags()
    parsed.feed(dom)
    assert "img" not in parsed.tags                                # the text stayed text
    for view in ("A", "B", "D"):                                   # one element per character in each view
        assert len(parsed.views[view]) == len(text)
