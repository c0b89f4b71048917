"""The new named endpoints through gradio_client against ``python app.py`` (tiny random checkpoints plus
a tiny flow model): results equal the library's, settings JSON replays (in the app and on the CLI,
byte for byte), and bad input (a noise level outside 0..1, an empty drawing, a malformed share
link, ...) is refused with a clear message while the server keeps serving."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio_client")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import running_app  # noqa: E402
from explore_fixtures import checkpoints_with_flow  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_core import explore as ex  # noqa: E402
from diffusion_core import sample  # noqa: E402
from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui.common import available_models, parse_settings  # noqa: E402
from diffusion_core.ui.explore_tab import denoise, edit_from_json, edit_share_query, forward_view, sdedit_image  # noqa: E402
from diffusion_core.ui.render import decode_png, png_bytes, split_grid  # noqa: E402

pytestmark = [pytest.mark.slow]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    return checkpoints_with_flow(tiny_checkpoints, tmp_path_factory.mktemp("with_flow"))


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory):
    with running_app(checkpoints, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def registry(checkpoints):
    return ModelRegistry(checkpoints)


def test_endpoints_are_named(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/explore_forward", "/explore_denoise", "/sdedit", "/sdedit_from_settings", "/compare_from_settings", "/open_link"} <= set(api)
    assert [p["parameter_name"] for p in api["/sdedit"]["parameters"]] == [
        "model", "digit", "guidance", "sampler", "steps", "eta", "routing", "seed", "index", "image", "level", "region"]


def test_forward_and_one_step(client, registry):
    path, info = client.predict(index=3, level=0.4, seed=5, api_name="/explore_forward")
    expected, exp_info = forward_view(ex.test_digit(3), 5, 0.4)
    assert np.array_equal(decode_png(Path(path).read_bytes()), expected)
    assert json.loads(info)["schedules"]["flow"]["sigma"] == pytest.approx(0.4 / 0.6)
    path, info = client.predict(index=3, level=0.4, seed=5, T=200, api_name="/explore_forward")
    assert np.array_equal(decode_png(Path(path).read_bytes()), forward_view(ex.test_digit(3), 5, 0.4, 200)[0])
    assert json.loads(info)["schedules"]["linear"]["T"] == 200
    path, info = client.predict(model="flow", digit="8", guidance=2.0, routing="gated", index=3, level=0.4, seed=5, api_name="/explore_denoise")
    d = json.loads(info)
    models = available_models(registry)
    out = denoise(registry, parse_settings(models, model="flow", digit=8, guidance=2.0, seed=5), ex.test_digit(3), 0.4, curve=False)
    assert d["mse"] == pytest.approx(out["info"]["mse"]) and d["schedule"] == "flow" and d["in_training_range"]
    assert np.array_equal(decode_png(Path(path).read_bytes()), out["image"])
    _, info = client.predict(model="cfg", digit="any", guidance=2.0, routing="gated", index=3, level=1.0, seed=5, api_name="/explore_denoise")
    assert json.loads(info)["in_training_range"] is True  # t = 1 is the schedule's last level
    _, info = client.predict(model="flow", digit="any", guidance=2.0, routing="gated", index=3, level=1.0, seed=5, api_name="/explore_denoise")
    assert json.loads(info)["in_training_range"] is False  # flow's t = 1 is sigma = 999, beyond the trained 80


def test_sdedit_replays_in_the_app_and_on_the_cli(client, registry, checkpoints, tmp_path):
    path, js = client.predict(model="cfg", digit="8", guidance=3.0, sampler="dpmpp_2m", steps=8, seed=11, index=18, level=0.5,
                              api_name="/sdedit")
    es = ex.EditSettings.from_json(js)
    assert (es.model, es.digit, es.index, es.level, es.steps) == ("cfg", 8, 18, 0.5, 8)
    png = Path(path).read_bytes()
    models = available_models(registry)
    assert png == png_bytes(sdedit_image(registry, edit_from_json(models, js), models["cfg"]))
    again, js2 = client.predict(js, api_name="/sdedit_from_settings")
    assert Path(again).read_bytes() == png and js2 == js
    (tmp_path / "sdedit.json").write_text(js)
    assert sample.main(["--settings", str(tmp_path / "sdedit.json"), "--grid", str(tmp_path / "cli.png"), "--checkpoint-dir", str(checkpoints)]) == 0
    assert (tmp_path / "cli.png").read_bytes() == png
    tab, text = client.predict("?" + edit_share_query(es, models["cfg"]).lstrip("?"), api_name="/open_link")
    assert tab == "explore" and ex.EditSettings.from_json(text) == es


def test_sdedit_of_an_image_inpainting_and_flow(client, tmp_path):
    canvas = Image.new("RGB", (280, 280), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(canvas).line([(90, 60), (190, 60), (120, 230)], fill="black", width=22)
    canvas.save(tmp_path / "seven.png")
    path, js = client.predict(model="flow", digit="1", steps=6, seed=2, index=0, image=handle_file(str(tmp_path / "seven.png")), level=0.7,
                              region="bottom", api_name="/sdedit")
    es = ex.EditSettings.from_json(js)
    assert es.drawing is not None and es.index is None and es.region == "bottom"
    result = split_grid(decode_png(Path(path).read_bytes()), 1)[0]
    # Inpainting keeps the digit outside the region: the top half is the drawn digit (up to rounding).
    assert np.abs(result[:14].astype(int) - ex.decode_digit(es.drawing)[:14].astype(int)).max() <= 1
    again, _ = client.predict(js, api_name="/sdedit_from_settings")
    assert Path(again).read_bytes() == Path(path).read_bytes()


def test_compare_eta_axis_and_replay(client, checkpoints, tmp_path):
    path, js = client.predict(axis="eta", values="0, 1, ddpm", model="cfg", digit="3", steps=4, seed=9, api_name="/compare")
    meta = json.loads(js)
    assert meta["kind"] == "compare" and meta["values"] == ["0.0", "1.0", "ddpm"]
    assert [r["sampler"] for r in meta["rows"]] == ["ddim", "ddim", "ddpm"]
    again, js2 = client.predict(js, api_name="/compare_from_settings")
    assert Path(again).read_bytes() == Path(path).read_bytes() and json.loads(js2) == meta
    (tmp_path / "compare.json").write_text(js)
    assert sample.main(["--settings", str(tmp_path / "compare.json"), "--grid", str(tmp_path / "g.png"), "--checkpoint-dir", str(checkpoints)]) == 0
    assert (tmp_path / "g.png").read_bytes() == Path(path).read_bytes()


BAD = [
    ("/explore_forward", dict(index=3, level=1.5), "noise level must be between 0 and 1, got 1.5"),
    ("/explore_forward", dict(index=3, level=-0.1), "noise level must be between 0 and 1"),
    ("/explore_forward", dict(index=10_000, level=0.5), "digit index must be between 0 and 999"),
    ("/explore_forward", dict(index=3, T=300), "schedule length T must be one of 200, 1000, 5000, got '300"),
    ("/explore_denoise", dict(model="cfg", digit="any", guidance=2, routing="gated", index=1, level=2), "noise level must be between 0 and 1"),
    ("/sdedit", dict(index=3, level=0), "noise level must be above 0"),
    ("/sdedit", dict(index=3, level=7), "noise level must be between 0 and 1, got 7"),
    ("/sdedit", dict(index=3, region="middle"), "unknown region 'middle'"),
    ("/sdedit", dict(index=3, steps=0), "steps must be between 1 and 1000"),
    ("/sdedit_from_settings", dict(settings_json="{"), "not valid JSON"),
    ("/sdedit_from_settings", dict(settings_json="{}"), "not an SDEdit result"),  # not silently the defaults
    ("/sdedit_from_settings", dict(settings_json="[" * 5000), "nested too deeply"),
    ("/compare_from_settings", dict(settings_json="[" * 5000), "nested too deeply"),  # was an internal RecursionError
    ("/generate_from_settings", dict(settings_json="[" * 5000), "nested too deeply"),
    ("/sdedit_from_settings", dict(settings_json='{"kind": "sdedit", "index": 2, "drawing": "eJw"}'), "either an MNIST test digit index or a drawing"),
    ("/compare_from_settings", dict(settings_json='{"axis": "eta"}'), "not a comparison"),
    ("/compare", dict(axis="eta", values="0, 1.5"), "eta must be between 0 and 1"),
    ("/open_link", dict(link="http://host/?v=1&tab=compare&model=cfg&axis=eta&values=0,2"), "this share link is malformed"),
    ("/open_link", dict(link="?v=1&tab=explore&model=cfg&drawing=%%%&level=0.5"), "the drawing is malformed"),
    ("/open_link", dict(link="?v=1&tab=explore&model=cfg&index=3&level=1.5"), "noise level must be between 0 and 1"),
    ("/open_link", dict(link="?v=7&model=cfg"), "version '7' is not supported"),
    ("/open_link", dict(link="?v=1&tab=elsewhere"), "unknown tab 'elsewhere'"),
    ("/open_link", dict(link="?v=1&model=cfg&level=0.5"), "level does not belong to a generate link"),
]


def test_bad_input_is_refused_clearly_and_the_server_keeps_serving(client, tmp_path):
    Image.new("RGB", (200, 200), "white").save(tmp_path / "blank.png")
    Image.new("RGBA", (200, 200), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    cases = BAD + [("/sdedit", dict(index=0, image=handle_file(str(tmp_path / "blank.png"))), "the drawing is empty"),
                   ("/explore_forward", dict(index=0, image=handle_file(str(tmp_path / "transparent.png")), level=0.5), "the drawing is empty")]
    for endpoint, kwargs, message in cases:
        with pytest.raises(Exception) as e:
            client.predict(**kwargs, api_name=endpoint)
        assert message in str(e.value), (endpoint, kwargs, str(e.value))
    path, js = client.predict(index=2, level=0.3, steps=3, api_name="/sdedit")  # still serving
    assert Path(path).is_file() and ex.EditSettings.from_json(js).index == 2
