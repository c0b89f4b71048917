"""The Explore tab, Compare share links and the model cards in headless Chromium (Playwright driving
Debian's chromium), against ``python app.py`` on tiny random checkpoints plus a tiny flow model:

* a Compare share link opened in a fresh page restores the tab and gives a byte-identical grid PNG,
  which is also what ``python -m diffusion_core.sample --settings compare.json --grid`` writes;
* the Explore tab renders, its slider changes the noisy images, and a digit drawn with the mouse on
  the sketchpad goes through SDEdit to a final image;
* the model menu and the Models tab show every checkpoint, the flow model included.

``UPDATE_ASSETS=1`` (with the shipped checkpoints) also saves assets/app_explore.png for docs/app.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import ROOT, running_app  # noqa: E402
from browser_support import UPDATE_ASSETS, browser, fetch, filled_textbox, image_bytes, new_page, page, set_number, shipped_checkpoints, wait_image  # noqa: E402, F401  (browser, page: fixtures)
from explore_fixtures import checkpoints_with_flow  # noqa: E402

from diffusion_core import reproducible, sample  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    return shipped_checkpoints() or checkpoints_with_flow(tiny_checkpoints, tmp_path_factory.mktemp("with_flow"))


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    with running_app(checkpoints, tmp_path_factory.mktemp("app") / "app.log", threads=reproducible.THREADS) as url:
        yield url


def download(page, files_id: str, name: str) -> bytes:
    """The file called ``name`` from a gr.File list of downloads."""
    link = page.locator(f"#{files_id} a[download='{name}']").first
    link.wait_for()
    return fetch(page, link.get_attribute("href"))


def test_compare_share_link_reproduces_the_grid(server, page, checkpoints, tmp_path):
    page.goto(server + "?model=cfg&steps=4&seed=7")
    page.locator("#status").filter(has_text="Done").wait_for()
    page.get_by_role("tab", name="Compare").click()
    page.locator("#axis label", has_text="DDIM eta").click()
    filled_textbox(page, "values", containing="ddpm")  # the eta axis puts DDPM's sampler beside DDIM
    page.locator("#compare_btn").click()
    page.locator("#compare_img img").wait_for()
    link = filled_textbox(page, "compare_link", containing="tab=compare")
    assert link.startswith(server) and "axis=eta" in link and "seed=7" in link and "steps=4" in link
    grid = image_bytes(page, "#compare_img img")
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    settings = download(page, "compare_files", "compare.json")

    fresh = new_page(page.context.browser)
    fresh.goto(link)
    fresh.locator("#compare_img img").wait_for()
    assert fresh.get_by_role("tab", name="Compare").get_attribute("aria-selected") == "true"
    assert fresh.locator("#axis input[value='eta']").is_checked()
    assert fresh.locator("#seed input").input_value() == "7"
    assert image_bytes(fresh, "#compare_img img") == grid  # the same grid, byte for byte
    assert fresh.locator("#final img").count() == 0  # a compare link does not generate
    fresh.context.close()

    (tmp_path / "compare.json").write_bytes(settings)
    out = tmp_path / "grid.png"
    threads = torch.get_num_threads()
    try:  # the CLI runs at the app's thread count by default, as the server does
        assert sample.main(["--settings", str(tmp_path / "compare.json"), "--grid", str(out), "--checkpoint-dir", str(checkpoints)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert out.read_bytes() == grid  # the CLI writes the same PNG


def _draw_stroke(page, selector: str, points: list[tuple[float, float]]):
    """Drag the mouse through ``points`` (fractions of the canvas) with the button held."""
    box = page.locator(selector).bounding_box()
    x = lambda fx: box["x"] + fx * box["width"]  # noqa: E731
    y = lambda fy: box["y"] + fy * box["height"]  # noqa: E731
    page.mouse.move(x(points[0][0]), y(points[0][1]))
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(x(fx), y(fy), steps=8)
    page.mouse.up()


def test_explore_tab_slider_and_drawn_digit_through_sdedit(server, page, tmp_path):
    page.goto(server)
    page.locator("#status").filter(has_text="Done").wait_for()
    page.get_by_role("tab", name="Explore").click()
    page.locator("#ex_forward img").wait_for()
    page.locator("#ex_denoise img").wait_for()
    page.locator("#ex_schedule img").wait_for()
    page.locator("#ex_error img").wait_for()
    before = page.locator("#ex_forward img").get_attribute("src")
    before_den = page.locator("#ex_denoise img").get_attribute("src")
    set_number(page, "ex_level", 0.9)
    page.wait_for_function("s => { const i = document.querySelector('#ex_forward img'); return i && i.src && i.src !== s; }", arg=before)
    page.wait_for_function("s => { const i = document.querySelector('#ex_denoise img'); return i && i.src && i.src !== s; }", arg=before_den)
    assert image_bytes(page, "#ex_forward img") != fetch(page, before)
    assert "t = 0.90" in page.locator("#ex_denoise_text").inner_text()

    # Draw a "7" with the mouse: a top bar, then a diagonal down.
    before = page.locator("#ex_forward img").get_attribute("src")
    canvas = "#ex_sketch canvas"
    page.locator(canvas).first.wait_for()
    page.locator("#ex_sketch button[aria-label='Brush']").first.click()  # as a visitor does: pick the brush, then draw
    _draw_stroke(page, canvas + " >> nth=0", [(0.3, 0.25), (0.7, 0.25), (0.45, 0.8)])
    page.locator("#ex_source input[value='drawing']").wait_for()
    page.wait_for_function("() => document.querySelector(\"#ex_source input[value='drawing']\").checked")
    # the server has the drawing: the forward process now shows it
    page.wait_for_function("s => { const i = document.querySelector('#ex_forward img'); return i && i.src && i.src !== s; }", arg=before)
    set_number(page, "ex_level", 0.6)
    page.locator("#ex_run").click()
    page.locator("#ex_status").filter(has_text="Done").wait_for()
    page.locator("#ex_final img").wait_for()
    final = image_bytes(page, "#ex_final img")
    assert final[:8] == b"\x89PNG\r\n\x1a\n"
    link = filled_textbox(page, "ex_link", containing="drawing=")
    assert "tab=explore" in link and "level=0.6" in link
    page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)

    other = page.context.new_page()  # the share link reproduces the SDEdit result of the drawing
    other.goto(link)
    other.locator("#ex_status").filter(has_text="Done").wait_for()
    wait_image(other, "ex_final", "ex_status")
    assert image_bytes(other, "#ex_final img") == final
    if UPDATE_ASSETS:
        other.locator("#ex_forward img").wait_for()
        other.locator("#ex_error img").wait_for()
        (ROOT / "assets").mkdir(exist_ok=True)
        other.screenshot(path=str(ROOT / "assets" / "app_explore.png"), full_page=True)


def test_models_menu_and_cards_show_every_checkpoint(server, page, checkpoints):
    page.goto(server)
    page.locator("#status").filter(has_text="Done").wait_for()
    names = sorted(p.stem for p in Path(checkpoints).glob("*.safetensors"))
    page.get_by_role("tab", name="Models").click()
    cards = page.locator(".model-card")
    cards.first.wait_for()
    assert cards.count() == len(names)
    if "flow" in names:
        assert page.locator("#model label", has_text="Flow matching").count() == 1
        card = page.locator(".model-card", has_text="Flow matching")
        assert card.count() == 1 and "rectified_flow" in card.inner_text()
