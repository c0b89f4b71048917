"""End to end in headless Chromium (Playwright driving Debian's chromium): load the page, change
controls, generate, watch streamed frames and the final image, open the share link and get the
pixel-identical image, save a screenshot (``UPDATE_ASSETS=1`` also writes assets/app_screenshot.png)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import ROOT, running_app  # noqa: E402
from browser_support import TIMEOUT_MS, UPDATE_ASSETS, browser, filled_textbox, image_bytes, page, set_number, shipped_checkpoints, sync_api  # noqa: E402, F401  (browser, page: fixtures)

from diffusion_core.pipeline import (  # noqa: E402
    APP_AUTOGUIDANCE,  # noqa: E402
    APP_AUTOGUIDANCE_OF_MODEL,
    Settings,
    generate,
)
from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui.common import AUTOGUIDANCE_HELP, AUTOGUIDE_HELP, MENU_ROUTINGS, MODEL_LABELS, routing_help, routing_label  # noqa: E402
from diffusion_core.ui.render import decode_png, split_grid  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints_with_parts):
    """Tiny random checkpoints (with an ``mcl_parts``); the shipped ones with UPDATE_ASSETS=1 (see ``shipped_checkpoints``)."""
    return shipped_checkpoints() or tiny_checkpoints_with_parts


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    with running_app(checkpoints, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


def wait_done(page, text: str = "Done"):
    page.locator("#status").filter(has_text=text).wait_for(timeout=TIMEOUT_MS)
    page.locator("#final img").wait_for(timeout=TIMEOUT_MS)


COUNT_FRAMES = """() => {
    window.__frames = new Set();
    const root = document.querySelector('#noisy');
    const record = () => { const img = root.querySelector('img'); if (img && img.src) window.__frames.add(img.src); };
    new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""


def expected_images(checkpoints, settings: Settings) -> np.ndarray:
    registry = ModelRegistry(checkpoints)
    model, gate = registry.for_settings(settings)
    return generate(settings, model, gate, guide=registry.guide_for(settings, model)).images.numpy()


def test_generate_stream_share_link(server, page, checkpoints, tmp_path):
    page.goto(server)
    wait_done(page)  # the page generates the default settings on load
    assert page.locator("#digit").is_visible() and not page.locator("#routing").is_visible()

    page.locator("#digit label", has_text="7").click()
    set_number(page, "steps", 300)
    set_number(page, "n", 2)
    page.locator("#seed input").fill("4242")
    page.locator("#sampler input").click()
    page.get_by_role("option", name="Euler").click()
    page.evaluate(COUNT_FRAMES)
    page.locator("#run").click()
    wait_done(page, "300 steps")

    frames = page.evaluate("() => window.__frames.size")
    assert frames >= 3, f"saw {frames} distinct streamed frames"  # noise, live steps, final
    settings = Settings(model="cfg", digit=7, steps=300, seed=4242, sampler="euler", n=2)
    final = image_bytes(page, "#final img")
    assert np.array_equal(split_grid(decode_png(final), 2), expected_images(checkpoints, settings))
    page.locator("#filmstrip img").wait_for()

    link = filled_textbox(page, "share_link")
    assert link.startswith(server) and "digit=7" in link and "seed=4242" in link and "steps=300" in link
    assert page.url == link  # the address bar is the share link too
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)

    other = page.context.new_page()
    other.goto(link)
    wait_done(other, "300 steps")
    assert other.locator("#digit input[value='7']").is_checked()
    assert other.locator("#seed input").input_value() == "4242"
    assert image_bytes(other, "#final img") == final  # pixel-identical (byte-identical PNG)
    other.screenshot(path=str(tmp_path / "shared.png"), full_page=True)
    if UPDATE_ASSETS:  # the README's picture: sixteen digits, 0-9 then 0-5
        other.goto(server + "?v=1&model=cfg&digit=any&guidance=2.0&sampler=dpmpp_2m&steps=16&seed=0&n=16")
        wait_done(other, "16 steps")
        other.locator("#filmstrip img").wait_for()
        (ROOT / "assets").mkdir(exist_ok=True)
        other.screenshot(path=str(ROOT / "assets" / "app_screenshot.png"), full_page=True)


def test_mcl_controls_chart_and_compare(server, page, checkpoints, tmp_path):
    page.goto(server + "?model=mcl&steps=8&n=3&seed=1")  # no routing in the link: the app's default
    wait_done(page, "8 steps")
    assert page.locator("#routing").is_visible() and not page.locator("#digit").is_visible()
    default = Settings().routing
    assert page.locator("#routing input").input_value() == routing_label(default)
    assert routing_help(default)[:40] in page.locator("#routing").inner_text()  # the sentence under the menu
    assert f"routing={default}" in filled_textbox(page, "share_link")
    page.locator("#chart").wait_for(state="visible")
    page.locator("#chart img").wait_for()  # experts per step, and the gate's probabilities
    if (checkpoints / "mcl_shared.safetensors").exists():  # the tiny folder: mcl is separate experts with a gating network
        assert "Gating network" in page.locator("#chart_caption").inner_text()
    page.locator("#routing input").click()
    offered = [t.replace("✓", "").strip() for t in page.get_by_role("option").all_inner_texts()]  # the selected one is ticked
    assert offered == [routing_label(r) for r in MENU_ROUTINGS]
    page.keyboard.press("Escape")

    other = page.context.new_page()  # a link with a routing outside the menu keeps it, and reproduces
    other.goto(server + "?v=1&model=mcl&sampler=dpmpp_2m&steps=4&routing=expert:1&seed=2&n=1")
    wait_done(other, "4 steps")
    assert other.locator("#routing input").input_value() == "expert 1 only"
    other.close()

    page.goto(server + "?model=mcl&routing=sampled&steps=8&n=3&seed=2")  # the default, named in the link
    wait_done(page, "8 steps")
    page.locator("#chart img").wait_for()
    if UPDATE_ASSETS:  # the README's MCL picture: live expert chart of three images
        page.screenshot(path=str(ROOT / "assets" / "app_mcl.png"), full_page=True)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare_btn").click()
    page.locator("#compare_img img").wait_for()
    page.get_by_role("tab", name="Models").click()
    assert page.locator(".model-card").count() >= 4
    page.screenshot(path=str(tmp_path / "mcl.png"), full_page=True)


def test_shared_mcl_chart_shows_the_score_head(server, page, checkpoints):
    """MCL hypotheses on one network: the chart's lower panel is the score head, and the sentence under
    the chart says what its probabilities mean; the routing help names the score head too."""
    name = "mcl_shared" if (checkpoints / "mcl_shared.safetensors").exists() else "mcl"
    page.goto(server + f"?model={name}&steps=6&n=2&seed=3")
    wait_done(page, "6 steps")
    page.locator("#chart img").wait_for()
    caption = page.locator("#chart_caption").filter(has_text="Score head")
    caption.wait_for(timeout=TIMEOUT_MS)
    assert "owns" in caption.inner_text()
    assert "score head" in page.locator("#routing").inner_text()
    assert "gating network" not in page.locator("#routing").inner_text()


def test_autoguidance_control_and_its_share_link(server, page, checkpoints):
    """Picking the DDPM shows the autoguidance slider at the app's weight (and hides CFG's guidance);
    the image is the autoguided one, and its share link reproduces it byte for byte."""
    page.goto(server + "?v=1&model=cfg&digit=any&guidance=1.2&sampler=dpmpp_2m&steps=3&seed=1&n=1")
    wait_done(page, "3 steps")
    assert not page.locator("#autoguidance").is_visible() and page.locator("#guidance").is_visible()
    page.locator("#model label", has_text=MODEL_LABELS["ddpm"]).click()
    page.locator("#autoguidance").wait_for(state="visible")
    assert not page.locator("#guidance").is_visible()
    w = APP_AUTOGUIDANCE["ddpm"]
    sync_api.expect(page.locator("#autoguidance input[type=number]")).to_have_value(f"{w:g}")
    assert AUTOGUIDANCE_HELP[:40] in page.locator("#autoguidance").inner_text()  # the sentence under the control
    set_number(page, "autoguidance", 2.5)
    set_number(page, "n", 2)
    set_number(page, "steps", 4)  # another step count than the page's first image, so the status tells the two runs apart
    page.locator("#run").click()
    wait_done(page, "4 steps")
    final = image_bytes(page, "#final img")
    expected = expected_images(checkpoints, Settings(model="ddpm", steps=4, seed=1, n=2, autoguidance=2.5, guide="ddpm_weak"))
    assert np.array_equal(split_grid(decode_png(final), 2), expected)
    link = filled_textbox(page, "share_link", "autoguidance=2.5")
    assert "guide=ddpm_weak" in link
    other = page.context.new_page()
    other.goto(link)
    wait_done(other, "4 steps")
    sync_api.expect(other.locator("#autoguidance input[type=number]")).to_have_value("2.5")
    assert image_bytes(other, "#final img") == final
    other.close()


def test_autoguide_control_follows_the_model(server, page, checkpoints):
    """mcl_parts picked by hand starts from its own guidance (weight 3 of its experts' mixture): the
    control says what the guide is compared with, the image is that guided one, and its share link
    reproduces it. The control shows only for an MCL on one network and falls back to the output."""
    w, of = APP_AUTOGUIDANCE_OF_MODEL["mcl_parts"]
    page.goto(server + "?v=1&model=ddpm&sampler=dpmpp_2m&steps=3&seed=1&n=1")
    wait_done(page, "3 steps")
    assert page.locator("#autoguidance").is_visible() and not page.locator("#autoguide").is_visible()
    page.locator("#model label", has_text=MODEL_LABELS["mcl_parts"]).click()
    page.locator("#autoguide").wait_for(state="visible")
    sync_api.expect(page.locator("#autoguidance input[type=number]")).to_have_value(f"{w:g}")
    sync_api.expect(page.locator("#autoguide input:checked")).to_have_value(of)
    assert AUTOGUIDE_HELP[:40] in page.locator("#autoguide").inner_text()
    set_number(page, "n", 2)
    set_number(page, "steps", 4)
    page.locator("#run").click()
    wait_done(page, "4 steps")
    final = image_bytes(page, "#final img")
    settings = Settings(model="mcl_parts", steps=4, seed=1, n=2, autoguidance=w, guide="ddpm_weak", autoguide=of)
    assert np.array_equal(split_grid(decode_png(final), 2), expected_images(checkpoints, settings))
    link = filled_textbox(page, "share_link", f"autoguide={of}")
    assert f"autoguidance={float(w)!r}" in link
    other = page.context.new_page()
    other.goto(link)
    wait_done(other, "4 steps")
    sync_api.expect(other.locator("#autoguide input:checked")).to_have_value(of)
    assert image_bytes(other, "#final img") == final
    other.close()
    page.locator("#autoguide label", has_text="output").click()  # the same weight on the chosen expert's output: another image
    page.locator("#run").click()
    sync_api.expect(page.locator("#share_link textarea, #share_link input").first).not_to_have_value(re.compile("autoguide="), timeout=TIMEOUT_MS)
    assert image_bytes(page, "#final img") != final
    page.locator("#model label", has_text=MODEL_LABELS["ddpm"]).click()
    page.locator("#autoguide").wait_for(state="hidden")


def test_malformed_share_link_shows_error_and_app_still_works(server, page):
    page.goto(server + "?model=cfg&steps=abc&digit=11")
    page.get_by_text("share link is malformed").first.wait_for()
    set_number(page, "steps", 3)
    page.locator("#run").click()
    wait_done(page, "3 steps")


def test_browser_benchmark_measures_a_visit(server, browser):
    """bench_app --browser against the live app: the first frame comes before the final image."""
    from benchmarks.bench_app import bench_browser

    r = bench_browser(server, repeats=1, browser=browser)
    assert 0 < r["browser_first_frame_s"] < r["browser_final_image_s"] < 60
