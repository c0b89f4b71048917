"""Explore's cold-diffusion panel end to end: the endpoints through gradio_client (results equal the
library's, bad input refused with a clear message while the server keeps serving), and in headless
Chromium the panel's restoration and the Models tab's training history (the shipped cold_blur_v2; the first, cold_blur, for old links)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio_client")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import ROOT, running_app  # noqa: E402
from browser_support import TIMEOUT_MS, browser, filled_textbox, image_bytes, page, wait_image  # noqa: E402, F401, F811  (browser, page: fixtures)
from gradio_client import Client  # noqa: E402

from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui import cold_panel  # noqa: E402
from diffusion_core.ui.render import decode_png  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # as the test server computes (tests/app_server.py)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("with_cold")
    for f in Path(tiny_checkpoints).glob("*.safetensors"):
        shutil.copy2(f, d / f.name)
    for name in ("cold_blur_v2", "cold_blur"):
        shutil.copy2(ROOT / "checkpoints" / f"{name}.safetensors", d / f"{name}.safetensors")
    return d


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    with running_app(checkpoints, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_cold_endpoints_equal_the_library(client, checkpoints):
    registry = ModelRegistry(checkpoints)
    path, info = client.predict(index=3, level=12, degradation="blur", api_name="/cold_restore")
    expected = cold_panel.restore_view(registry, "blur", 12, 3)
    assert np.array_equal(decode_png(Path(path).read_bytes()), expected["image"])
    d = json.loads(info)
    assert d["level"] == 12 and d["mse_improved"] == pytest.approx(expected["info"]["mse_improved"])
    path, settings = client.predict(seed=4, n=3, sampler="naive", degradation="blur", api_name="/cold_generate")
    assert np.array_equal(decode_png(Path(path).read_bytes()), cold_panel.generate_view(registry, "blur", 4, 3, "naive")["image"])
    assert json.loads(settings) == {"kind": "cold_generate", "degradation": "blur", "seed": 4, "n": 3, "sampler": "naive", "model": "cold_blur_v2"}
    path, _ = client.predict(seed=4, n=3, sampler="naive", degradation="blur", model="cold_blur", api_name="/cold_generate")
    assert np.array_equal(decode_png(Path(path).read_bytes()), cold_panel.generate_view(registry, "blur", 4, 3, "naive", "cold_blur")["image"])


def test_cold_from_settings_and_open_link_replay_the_same_bytes(client):
    restored, _ = client.predict(index=3, level=12, degradation="blur", api_name="/cold_restore")
    settings = cold_panel.ColdRestore("blur", 12, 3, model="cold_blur_v2").to_json()
    again, js = client.predict(settings_json=settings, api_name="/cold_from_settings")
    assert Path(again).read_bytes() == Path(restored).read_bytes() and json.loads(js)["kind"] == "cold_restore"
    grid, gen_js = client.predict(seed=4, n=3, sampler="naive", degradation="blur", api_name="/cold_generate")
    again, _ = client.predict(settings_json=gen_js, api_name="/cold_from_settings")
    assert Path(again).read_bytes() == Path(grid).read_bytes()
    tab, text = client.predict(link="http://host/" + cold_panel.cold_share_query(json.loads(gen_js)), api_name="/open_link")
    assert tab == "cold" and json.loads(text) == json.loads(gen_js)


BAD = [
    ("/cold_restore", dict(index=3, level=21), "blur level must be between 0 and 20, got 21"),
    ("/cold_restore", dict(index=3, level=-1), "blur level must be between 0 and 20"),
    ("/cold_restore", dict(index=3, level=20, degradation="pixelate"), "unknown degradation 'pixelate'; expected one of blur"),
    ("/cold_restore", dict(index=5000, level=5), "digit index must be between 0 and 999"),
    ("/cold_generate", dict(seed=0, n=17), "number of images must be between 1 and 16"),
    ("/cold_generate", dict(seed=0, n=2, sampler="fancy"), "unknown cold-diffusion sampler 'fancy'"),
    ("/cold_generate", dict(seed=0, n=2, degradation="noise"), "unknown degradation 'noise'"),
    ("/cold_from_settings", dict(settings_json="{}"), "not a cold-diffusion result"),
    ("/cold_from_settings", dict(settings_json="[" * 5000), "nested too deeply"),
    ("/cold_from_settings", dict(settings_json='{"kind": "cold_restore", "index": 1, "level": 30}'), "blur level must be between 0 and 20"),
    ("/open_link", dict(link="?v=1&tab=cold&cold=generate&n=99"), "number of images must be between 1 and 16"),
    ("/cold_restore", dict(index=3, level=5, model="ddpm"), "unknown blur model 'ddpm'"),
    ("/cold_generate", dict(seed=0, n=2, model="cold_blur_v9"), "unknown blur model 'cold_blur_v9'"),
    ("/open_link", dict(link="?v=1&tab=cold&cold=generate&model=mcl"), "unknown blur model 'mcl'"),
]


@pytest.mark.parametrize("endpoint, kwargs, message", BAD)
def test_bad_cold_input_is_refused_clearly_and_the_server_keeps_serving(client, endpoint, kwargs, message):
    with pytest.raises(Exception) as e:
        client.predict(**kwargs, api_name=endpoint)
    assert message in str(e.value)
    path, _ = client.predict(index=1, level=3, api_name="/cold_restore")
    assert Path(path).stat().st_size > 0


@pytest.mark.browser
def test_cold_panel_and_the_models_history_in_the_browser(server, page):
    page.goto(server)
    page.get_by_role("tab", name="Explore").click()  # at once, before the page's own load has finished
    page.locator("#status").filter(has_text="Done").wait_for(state="attached", timeout=TIMEOUT_MS)  # Generate's first images
    assert page.get_by_role("tab", name="Explore").get_attribute("aria-selected") == "true"  # the load did not switch back
    page.locator("#cold_run").click()
    page.locator("#cold_text").filter(has_text="naive").wait_for(timeout=TIMEOUT_MS)
    assert "tab=cold&cold=restore" in filled_textbox(page, "cold_link", containing="cold=restore")
    page.locator("#cold_strip").scroll_into_view_if_needed()
    wait_image(page, "cold_strip")
    page.locator("#cold_gen").click()
    page.locator("#cold_json").filter(has_text="cold_generate").wait_for(timeout=TIMEOUT_MS)
    page.locator("#cold_grid").scroll_into_view_if_needed()
    wait_image(page, "cold_grid")
    page.get_by_role("tab", name="Models").click()
    card = page.locator(".model-card").filter(has_text="0.5 to 7 pixels")  # cold_blur_v2, the restorer Explore uses
    card.locator(".history-grid img").first.wait_for(timeout=TIMEOUT_MS)
    assert card.locator(".history-grid img").count() == 3
    assert card.locator(".history-grid img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    assert card.locator("svg.loss-curve polyline").count() == 1
    assert page.locator(".model-card").filter(has_text="no training history recorded").count() >= 1


@pytest.mark.browser
def test_a_cold_link_opens_explore_with_the_same_result(server, page, client):
    grid, gen_js = client.predict(seed=5, n=4, sampler="improved", degradation="blur", api_name="/cold_generate")
    query = cold_panel.cold_share_query(json.loads(gen_js))
    page.goto(server + query)
    page.locator("#cold_grid img").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.locator("#cold_grid").scroll_into_view_if_needed()  # far down the page: its image loads lazily
    wait_image(page, "cold_grid")
    assert page.get_by_role("tab", name="Explore").get_attribute("aria-selected") == "true"
    assert np.array_equal(decode_png(image_bytes(page, "#cold_grid img")), decode_png(Path(grid).read_bytes()))
    assert filled_textbox(page, "cold_link", containing="tab=cold").endswith(query)
    assert page.locator("#cold_seed input").input_value() == "5"
    restored, _ = client.predict(index=7, level=15, degradation="blur", api_name="/cold_restore")
    page.goto(server + cold_panel.cold_share_query({"kind": "cold_restore", "degradation": "blur", "level": 15, "index": 7, "model": "cold_blur_v2"}))
    page.locator("#cold_strip img").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.locator("#cold_strip").scroll_into_view_if_needed()
    wait_image(page, "cold_strip")
    assert np.array_equal(decode_png(image_bytes(page, "#cold_strip img")), decode_png(Path(restored).read_bytes()))
    old, _ = client.predict(index=7, level=15, degradation="blur", model="cold_blur", api_name="/cold_restore")
    page.goto(server + "?v=1&tab=cold&cold=restore&degradation=blur&level=15&index=7")  # a link from before cold_blur_v2
    page.locator("#cold_text").filter(has_text="cold_blur, blur level 15").wait_for(timeout=TIMEOUT_MS)
    page.locator("#cold_strip").scroll_into_view_if_needed()
    wait_image(page, "cold_strip")
    assert np.array_equal(decode_png(image_bytes(page, "#cold_strip img")), decode_png(Path(old).read_bytes()))

