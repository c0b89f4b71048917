"""Share links and settings JSON made in the past keep reproducing the same bytes.

A fixed set of links (every tab, every model kind, the routings, guidance, autoguidance, DDIM eta,
a drawing and inpainting) and of settings JSON texts, opened as the app opens them, on the shipped
checkpoints. The SHA-256 of each resulting PNG was recorded in ``tests/data/share_hashes.json``
before the house refactor (issue 18) and must never change: a change here breaks every link that
people have shared. Record again only for a deliberate, announced break:

    python tests/test_share_regression.py --record
    python tests/test_share_regression.py --record-missing   # a newly added name only, recorded on the code before the change

Cold diffusion's four were added when it got a second restorer (issue 19), recorded on the code
before that change. All were recorded again once, when the app's numerics were pinned to AVX2
kernels and two threads (``diffusion_core.reproducible``): before that the bytes depended on the
machine's vector width and thread count; 7 of the 26 changed, by one grey level in at most 324
pixels of a grid (docs/app.md, "Reproducible bytes").
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HASHES = Path(__file__).resolve().parent / "data" / "share_hashes.json"
sys.path.insert(0, str(ROOT))

from diffusion_core import reproducible  # noqa: E402
from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui import cold_panel  # noqa: E402
from diffusion_core.ui.common import available_models, settings_from_json  # noqa: E402
from diffusion_core.ui.compare_tab import compare, compare_from_json  # noqa: E402
from diffusion_core.ui.explore_tab import edit_from_json, sdedit_image  # noqa: E402
from diffusion_core.ui.generate_tab import generate_image  # noqa: E402
from diffusion_core.ui.links import parse_link  # noqa: E402
from diffusion_core.ui.render import png_bytes  # noqa: E402

LINKS = {
    "generate_ddpm": "?v=1&model=ddpm&sampler=dpmpp_2m&steps=8&seed=3&n=4",
    "generate_ddpm_ddim_eta": "?v=1&model=ddpm&sampler=ddim&steps=6&eta=0.5&seed=11&n=2",
    "generate_ddpm_autoguidance": "?v=1&model=ddpm&sampler=heun&steps=5&autoguidance=1.5&guide=ddpm_weak&seed=2&n=2",
    "generate_cfg_digit": "?v=1&model=cfg&digit=7&guidance=2.0&sampler=dpmpp_2m&steps=8&seed=0&n=3",
    "generate_cfg_any": "?v=1&model=cfg&digit=any&guidance=1.2&sampler=euler&steps=6&seed=5&n=4",
    "generate_flow": "?v=1&model=flow&digit=3&guidance=1.5&sampler=euler&steps=8&seed=1&n=2",
    "generate_mcl_sampled": "?v=1&model=mcl&sampler=dpmpp_2m&steps=8&routing=sampled&seed=4&n=3",
    "generate_mcl_expert": "?v=1&model=mcl&sampler=ddpm&steps=6&routing=expert:1&seed=4&n=2",
    "generate_mcl_shared": "?v=1&model=mcl_shared&sampler=dpmpp_2m&steps=6&seed=9&n=2",
    "compare_samplers": "?v=1&model=ddpm&sampler=dpmpp_2m&steps=6&seed=0&n=1&tab=compare&axis=sampler&values=euler,heun,dpmpp_2m",
    "compare_eta": "?v=1&model=ddpm&sampler=ddim&steps=5&eta=0.0&seed=1&n=1&tab=compare&axis=eta&values=0,1,ddpm,ddpm_nonoise",
    "compare_guidance": "?v=1&model=cfg&digit=4&guidance=1.0&sampler=dpmpp_2m&steps=6&seed=2&n=1&tab=compare&axis=guidance&values=0,1,3",
    "compare_routing": "?v=1&model=mcl&sampler=dpmpp_2m&steps=6&routing=sampled&seed=3&n=1&tab=compare&axis=routing&values=sampled,soft,expert:0",
    "explore_index": "?v=1&model=ddpm&sampler=dpmpp_2m&steps=8&seed=0&n=1&tab=explore&index=5&level=0.6&region=none",
    "explore_inpaint_cfg": "?v=1&model=cfg&digit=8&guidance=2.0&sampler=euler&steps=6&seed=1&n=1&tab=explore&index=12&level=0.8&region=top",
    "explore_flow": "?v=1&model=flow&digit=any&guidance=1.0&sampler=heun&steps=5&seed=7&n=1&tab=explore&index=3&level=0.5&region=left",
    # cold diffusion's links from before it had a second restorer (no model: they mean cold_blur)
    "cold_restore": "?v=1&tab=cold&cold=restore&degradation=blur&level=14&index=6",
    "cold_generate": "?v=1&tab=cold&cold=generate&degradation=blur&seed=5&n=3&sampler=improved",
}

SETTINGS_JSON = {
    "json_generate_cfg": {"model": "cfg", "digit": 2, "guidance": 1.7, "sampler": "dpmpp_2m", "steps": 7, "seed": 12, "n": 2},
    "json_generate_mcl": {"model": "mcl", "routing": "soft", "sampler": "euler", "steps": 5, "seed": 1, "n": 2},
    "json_compare": {"kind": "compare", "axis": "sampler", "values": ["ddim", "dpmpp_2m"], "columns": 6,
                     "base": {"model": "ddpm", "sampler": "dpmpp_2m", "steps": 5, "seed": 8, "n": 1}},
    "json_sdedit": {"kind": "sdedit", "model": "ddpm", "sampler": "dpmpp_2m", "steps": 6, "seed": 3, "index": 40, "level": 0.7,
                    "region": "bottom"},
    "json_sdedit_cfg": {"kind": "sdedit", "model": "cfg", "digit": 3, "guidance": 2.0, "routing": "sampled", "eta": 0.0,
                        "sampler": "dpmpp_2m", "steps": 6, "seed": 5, "index": 9, "drawing": None, "level": 0.6, "region": "none"},
    "json_cold_restore": {"kind": "cold_restore", "degradation": "blur", "level": 20, "index": 11},
    "json_cold_generate": {"kind": "cold_generate", "degradation": "blur", "seed": 2, "n": 2, "sampler": "naive"},
}


def _drawing_link() -> str:
    """An Explore link with a drawing (the encoded digit is part of the link)."""
    from diffusion_core import explore as ex

    code = ex.encode_digit(ex.test_digit(7))
    return f"?v=1&model=ddpm&sampler=dpmpp_2m&steps=6&seed=2&n=1&tab=explore&drawing={code}&level=0.55&region=none"


def render(registry, models, name: str) -> bytes:
    """The PNG the app shows for a link or a settings JSON."""
    if name in SETTINGS_JSON:
        text = json.dumps(SETTINGS_JSON[name])
        if name.startswith("json_cold"):
            return png_bytes(cold_panel.cold_from_json(registry, text)["image"])
        if name == "json_compare":
            base, axis, rows, columns = compare_from_json(models, text)
            return png_bytes(compare(registry, rows, axis, columns, base=base)[0])
        if name.startswith("json_sdedit"):
            es = edit_from_json(models, text)
            return png_bytes(sdedit_image(registry, es, models[es.model]))
        s = settings_from_json(models, text)
        return png_bytes(generate_image(registry, s, models[s.model]))
    query = _drawing_link() if name == "explore_drawing" else LINKS[name]
    link = parse_link(models, query)
    if link.tab == "cold":
        return png_bytes(cold_panel.cold_view(registry, link.cold)["image"])
    if link.tab == "compare":
        return png_bytes(compare(registry, link.rows, link.axis, base=link.settings)[0])
    if link.tab == "explore":
        return png_bytes(sdedit_image(registry, link.edit, models[link.edit.model]))
    return png_bytes(generate_image(registry, link.settings, models[link.settings.model]))


NAMES = list(LINKS) + ["explore_drawing"] + list(SETTINGS_JSON)


@pytest.fixture(scope="module")
def shipped():
    registry = ModelRegistry(ROOT / "checkpoints")
    return registry, available_models(registry)


@pytest.mark.usefixtures("app_threads")  # the app's numerics: AVX2 kernels (conftest) and its thread count
@pytest.mark.parametrize("name", NAMES)
def test_an_old_share_link_reproduces_the_same_png(shipped, name):
    recorded = json.loads(HASHES.read_text())
    assert name in recorded, f"{name} has no recorded hash"
    assert hashlib.sha256(render(*shipped, name)).hexdigest() == recorded[name]


def record(missing_only: bool = False):
    """Record every hash, or (``missing_only``) only those of names added since, keeping the rest."""
    reproducible.pin()
    registry = ModelRegistry(ROOT / "checkpoints")
    models = available_models(registry)
    hashes = json.loads(HASHES.read_text()) if missing_only else {}
    hashes.update({name: hashlib.sha256(render(registry, models, name)).hexdigest() for name in NAMES if name not in hashes})
    HASHES.parent.mkdir(exist_ok=True)
    HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
    print(f"recorded {len(hashes)} hashes in {HASHES}")


if __name__ == "__main__":
    if "--record" in sys.argv or "--record-missing" in sys.argv:
        record(missing_only="--record-missing" in sys.argv)
    else:
        raise SystemExit(__doc__)
