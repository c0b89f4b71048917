"""Cold diffusion results come back from their share link and their settings JSON: the same pixels;
a malformed link or JSON is refused with a clear message (the shipped cold_blur)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_core import explore as ex
from diffusion_core.registry import ModelRegistry
from diffusion_core.ui import cold_panel as cp
from diffusion_core.ui.common import available_models
from diffusion_core.ui.links import parse_link

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped():
    registry = ModelRegistry(ROOT / "checkpoints")
    return registry, available_models(registry)


@pytest.mark.parametrize("make", [
    lambda r: cp.restore_view(r, "blur", 12, 3),
    lambda r: cp.restore_view(r, "blur", 20, None, ex.encode_digit(ex.test_digit(8))),  # a drawing travels in the link
    lambda r: cp.generate_view(r, "blur", 4, 3, "naive"),
], ids=["restore", "restore-drawing", "generate"])
def test_a_cold_result_comes_back_from_its_link_and_its_json(shipped, make):
    registry, models = shipped
    view = make(registry)
    link = parse_link(models, "http://host/" + view["share_query"])
    assert link.tab == "cold" and not link.is_plain
    again = cp.cold_view(registry, link.cold)
    assert np.array_equal(again["image"], view["image"]) and again["settings_json"] == view["settings_json"]
    assert link.cold == json.loads(view["settings_json"])
    replay = cp.cold_from_json(registry, view["settings_json"])
    assert np.array_equal(replay["image"], view["image"])


@pytest.mark.parametrize("query, message", [
    ("?v=1&tab=cold&cold=restore&level=12", "needs either index or drawing"),
    ("?v=1&tab=cold&cold=fly&index=1", "needs cold=restore or cold=generate"),
    ("?v=1&tab=cold&cold=restore&index=3&level=99", "blur level must be between 0 and 20"),
    ("?v=1&tab=cold&cold=restore&index=3000&level=5", "digit index must be between 0 and 999"),
    ("?v=1&tab=cold&cold=generate&n=40", "number of images must be between 1 and 16"),
    ("?v=1&tab=cold&cold=generate&sampler=fancy", "unknown cold-diffusion sampler 'fancy'"),
    ("?v=1&tab=cold&cold=restore&index=2&model=cfg", "unknown blur model 'cfg'"),
    ("?v=1&tab=cold&cold=restore&index=2&steps=3", "steps does not belong to a cold restore link"),
    ("?v=1&tab=cold&cold=generate&degradation=pixelate", "unknown degradation 'pixelate'"),
])
def test_a_malformed_cold_link_is_refused_clearly(shipped, query, message):
    with pytest.raises(ValueError, match="this share link is malformed") as e:
        parse_link(shipped[1], query)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("{}", "not a cold-diffusion result"),
    ("[" * 5000, "nested too deeply"),
    ('{"kind": "cold_restore", "index": 2, "drawing": "eJw"}', "either an MNIST test digit index or a drawing"),
    ('{"kind": "cold_generate", "n": 0}', "number of images must be between 1 and 16"),
    ('{"kind": "cold_generate", "steps": 3}', "unknown cold_generate settings ['steps']"),
    ('{"kind": "cold_generate", "model": "ddpm"}', "unknown blur model 'ddpm'"),
    ('{"kind": "cold_restore", "index": 1, "model": 7}', "unknown blur model '7'"),
    ("x" * 20_000, "at most 10000 characters"),
])
def test_bad_cold_settings_json_is_refused_clearly(shipped, text, message):
    with pytest.raises(ValueError) as e:
        cp.cold_from_json(shipped[0], text)
    assert message in str(e.value)


def test_the_current_restorer_is_the_default_and_the_first_stays_for_old_links(shipped):
    """The panel and the API use cold_blur_v2 and say so in the settings; settings and links without
    a model were written when cold_blur was the only restorer, so they still mean it (the share
    regression test holds their bytes); naming either one gives that one."""
    registry, models = shipped
    new = cp.restore_view(registry, "blur", 20, 5)
    assert json.loads(new["settings_json"])["model"] == "cold_blur_v2" == cp.COLD_MODELS["blur"][0]
    assert "model=cold_blur_v2" in new["share_query"] and new["info"]["blur_sigma_px"] == pytest.approx(7.0)
    old = cp.cold_from_json(registry, '{"kind": "cold_restore", "degradation": "blur", "level": 20, "index": 5}')
    assert json.loads(old["settings_json"])["model"] == "cold_blur" and old["info"]["blur_sigma_px"] == pytest.approx(10.0)
    assert not np.array_equal(old["image"], new["image"])
    named = cp.cold_from_json(registry, '{"kind": "cold_restore", "level": 20, "index": 5, "model": "cold_blur"}')
    assert np.array_equal(named["image"], old["image"])
    link = parse_link(models, "?v=1&tab=cold&cold=generate&seed=1&n=2")
    assert link.cold["model"] == "cold_blur"
    assert np.array_equal(cp.cold_view(registry, link.cold)["image"], cp.generate_view(registry, "blur", 1, 2, "improved", "cold_blur")["image"])
