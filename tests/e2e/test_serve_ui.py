"""The chat page in a real browser: Debian's headless Chromium, driven by Playwright.

The page is served by a real server that needs an API key. Without the key the browser is sent to the
login form, which refuses a wrong key; after signing in, an uploaded image and a question get an
answer that visibly streams in
(the bot message is recorded on every DOM change and must grow through several states). A
screenshot is saved. Skipped, with the reason, where Chromium or Playwright is missing; CI installs
Chromium (.ci/run). Playwright's own browser download is never used.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import pytest
from servers import serving

import vistune
from vistune.serve.api import create_app

CHROMIUM = os.environ.get("VISTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "ui-key"

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VISTUNE_CHROMIUM)")

RECORD = """() => {
  window.__bot = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    if (window.__bot[window.__bot.length - 1] !== text) window.__bot.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _wait_until_stable(page, timeout_s: float = 180.0) -> list[str]:
    """The recorded bot texts, once the last one has stopped changing for a second."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        states = page.evaluate("() => window.__bot")
        if states and states[-1].strip() and states[-1] == last:
            if time.monotonic() - since > 1.0:
                return states
        else:
            last, since = (states[-1] if states else None), time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"no stable answer in {timeout_s}s; saw {page.evaluate('() => window.__bot')}")


class GradioCalls:
    """The page's Gradio event calls still in flight (the heartbeat, which never ends, left out)."""

    def __init__(self, page) -> None:  # noqa: ANN001
        self.pending: set = set()
        self.page = page
        page.on("request", self._start)
        page.on("requestfinished", lambda request: self.pending.discard(request))
        page.on("requestfailed", lambda request: self.pending.discard(request))

    def _start(self, request) -> None:  # noqa: ANN001
        if "/gradio_api/" in request.url and "/heartbeat/" not in request.url and "/file=" not in request.url:
            self.pending.add(request)

    def wait_quiet(self, quiet_s: float = 1.5, timeout_s: float = 120.0) -> None:
        """Until no call has been in flight for `quiet_s`: ChatInterface follows a reply with a chain of
        calls, the last of which resets the textbox; an upload made before it lands is wiped."""
        deadline, since = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(100)  # lets Playwright deliver the request events
            if self.pending:
                since = time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return
        raise AssertionError(f"Gradio calls still in flight after {timeout_s}s: {[r.url for r in self.pending]}")


def test_browser_upload_ask_and_see_a_streamed_answer(tiny_checkpoint: Path, dataset_dir: Path,
                                                      tmp_path: Path) -> None:
    engine = vistune.load(str(tiny_checkpoint), device="cpu")
    engine.stop_ids = []  # the tiny model may end at once; a long reply makes the streaming visible
    image = dataset_dir / "images" / "img_0.png"
    with serving(lambda base: create_app(engine, "tiny", api_key=KEY, ui_path="/ui", ui_api_base=f"{base}/v1")) as base, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            calls = GradioCalls(page)
            # Not signed in: the login form, which refuses a wrong key and lets the right one through.
            page.goto(f"{base}/ui/")
            page.locator("input[name=key]").wait_for(timeout=120_000)
            page.locator("input[name=key]").fill("wrong-key")
            page.locator("button[type=submit]").click()
            page.get_by_text("That key is not valid").wait_for(timeout=60_000)
            page.locator("input[name=key]").fill(KEY)
            page.locator("button[type=submit]").click()
            box = page.locator("textarea[data-testid=textbox]").first
            box.wait_for(timeout=120_000)
            calls.wait_quiet()

            # An image and a question.
            page.evaluate(RECORD)
            # Submit only after the upload request has completed and its thumbnail is in the box:
            # a fixed sleep lost this race on a loaded machine. Timeouts are generous because
            # a 2-core machine running other tests can stall the page for tens of seconds.
            with page.expect_response(lambda r: "/gradio_api/upload" in r.url and r.ok, timeout=120_000):
                page.locator("input[type=file]").first.set_input_files(str(image))
            page.locator("img.thumbnail-image").first.wait_for(state="attached", timeout=120_000)
            calls.wait_quiet()
            assert page.locator("img.thumbnail-image").count() == 1  # still in the box
            box.fill("What colour is the shape?")
            box.press("Enter")
            states = _wait_until_stable(page)
            page.locator('[data-testid="user"] img').first.wait_for(state="attached", timeout=120_000)
            assert page.locator('[data-testid="user"] img').count() >= 1  # the upload is in the asked turn
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    answers = [s for s in states if s.strip() and "API error" not in s]
    assert len(set(answers)) >= 3, f"the answer did not stream: {answers}"
    # Each state extends the previous one (the reply grows; nothing is replaced).
    assert all(b.startswith(a.strip()) for a, b in itertools.pairwise(answers)), answers
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("VISTUNE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["VISTUNE_SCREENSHOT_DIR"]) / "serve-ui.png")
