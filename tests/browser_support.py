"""Shared pieces of the headless-Chromium tests (``test_app_browser``, ``test_explore_browser``):
Playwright driving Debian's chromium (never ``playwright install``), the browser and page fixtures,
and small page helpers. Importing this module skips the importing test module cleanly where
Playwright or chromium is missing."""
from __future__ import annotations

import os
import re
import shutil

import pytest
from app_server import ROOT

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium executable found (apt-get install chromium, or set CHROMIUM_PATH)", allow_module_level=True)

TIMEOUT_MS = 90_000
UPDATE_ASSETS = os.environ.get("UPDATE_ASSETS") == "1"  # also write the README's screenshots to assets/


def shipped_checkpoints():
    """``checkpoints/`` when ``UPDATE_ASSETS=1`` and the shipped files exist (so the screenshots show
    real digits), else None."""
    shipped = ROOT / "checkpoints"
    if UPDATE_ASSETS and all((shipped / f"{m}.safetensors").is_file() for m in ("ddpm", "cfg", "mcl", "gating")):
        return shipped
    return None


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def new_page(browser):
    """A page in a fresh browser context (no shared storage), with the tests' timeout on every page of it."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)  # also for pages opened later in it (a share link's second page)
    return context.new_page()


@pytest.fixture
def page(browser):
    pg = new_page(browser)
    yield pg
    pg.context.close()


def fetch(page, url_or_src: str) -> bytes:
    """The bytes behind a URL (or an image's src, relative to the page)."""
    resp = page.request.get(page.evaluate("s => new URL(s, window.location.href).href", url_or_src))
    assert resp.ok, resp.status
    return resp.body()


def image_bytes(page, selector: str) -> bytes:
    return fetch(page, page.locator(selector).get_attribute("src"))


def set_number(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def filled_textbox(page, elem_id: str, containing: str | None = None) -> str:
    """A textbox's value once the app has filled it (with ``containing`` in it, when given): links and
    settings arrive in the event after the final image, so reading right after ``wait_done`` can race them."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    if containing is None:
        sync_api.expect(box).not_to_have_value("", timeout=TIMEOUT_MS)
    else:
        sync_api.expect(box).to_have_value(re.compile(re.escape(containing)), timeout=TIMEOUT_MS)
    return box.input_value()


def wait_image(page, elem_id: str, status_id: str | None = None):
    """Wait for the ``<img>`` of the image component ``elem_id``; on a timeout, fail with what the
    component and the status line held (a CI run once saw the status say Done and no image)."""
    try:
        page.locator(f"#{elem_id} img").wait_for()
    except sync_api.TimeoutError:
        html = page.locator(f"#{elem_id}").first.evaluate("e => e.outerHTML")[:2000]
        status = page.locator(f"#{status_id}").inner_text() if status_id else ""
        pytest.fail(f"no image in #{elem_id} after {TIMEOUT_MS / 1000:.0f} s; status {status!r}; component HTML: {html}")
