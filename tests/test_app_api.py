"""The app's named API endpoints through gradio_client, against ``python app.py`` on a local port
(tiny random checkpoints): every endpoint, determinism, and bad input that fails cleanly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio_client")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_server import running_app  # noqa: E402
from gradio_client import Client  # noqa: E402

from diffusion_core.pipeline import (  # noqa: E402
    APP_AUTOGUIDANCE,  # noqa: E402
    APP_AUTOGUIDANCE_OF_MODEL,
    Settings,
    generate,
)
from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui.common import MENU_ROUTINGS  # noqa: E402
from diffusion_core.ui.render import decode_png, split_grid  # noqa: E402

pytestmark = [pytest.mark.slow]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


@pytest.fixture(scope="module")
def app_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app") / "app.log"


@pytest.fixture(scope="module")
def client(tiny_checkpoints_with_parts, app_log, tmp_path_factory):
    with running_app(tiny_checkpoints_with_parts, app_log) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no server log)"


@pytest.fixture(scope="module")
def registry(tiny_checkpoints_with_parts):
    return ModelRegistry(tiny_checkpoints_with_parts)


def _expected(registry, settings: Settings) -> np.ndarray:
    model, gate = registry.for_settings(settings)
    return generate(Settings(**settings.to_dict()), model, gate, guide=registry.guide_for(settings, model)).images.numpy()


def test_named_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert {"/generate", "/generate_from_settings", "/compare"} <= set(api["named_endpoints"])
    params = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert params == ["model", "digit", "guidance", "sampler", "steps", "eta", "routing", "seed", "n", "autoguidance", "guide", "autoguide"]


def test_generate_defaults_are_deterministic_and_exact(client, registry):
    path1, js1 = client.predict(api_name="/generate")
    path2, js2 = client.predict(api_name="/generate")
    b1, b2 = Path(path1).read_bytes(), Path(path2).read_bytes()
    assert b1[:8] == b"\x89PNG\r\n\x1a\n" and b1 == b2 and js1 == js2
    s = Settings.from_json(js1)
    assert s == Settings().validate()
    assert np.array_equal(split_grid(decode_png(b1), 1), _expected(registry, s))


def test_generate_settings_and_replay(client, registry):
    path, js = client.predict(model="mcl", routing="soft", sampler="heun", steps=3, seed=2**63 - 1, n=3, api_name="/generate")
    s = Settings.from_json(js)
    assert (s.model, s.routing, s.sampler, s.steps, s.seed, s.n) == ("mcl", "soft", "heun", 3, 2**63 - 1, 3)
    assert np.array_equal(split_grid(decode_png(Path(path).read_bytes()), 3), _expected(registry, s))
    path2, js2 = client.predict(settings_json=js, api_name="/generate_from_settings")
    assert Path(path2).read_bytes() == Path(path).read_bytes() and js2 == js
    path3, js3 = client.predict(model="cfg", digit="7", guidance=3, sampler="ddim", eta=0.5, steps=4, seed=9, n=2, api_name="/generate")
    assert json.loads(js3)["digit"] == 7 and json.loads(js3)["eta"] == 0.5
    assert np.array_equal(split_grid(decode_png(Path(path3).read_bytes()), 2), _expected(registry, Settings.from_json(js3)))


@pytest.mark.parametrize("kwargs, rows", [
    (dict(axis="sampler", values="euler, dpmpp_2m", model="cfg", digit=3, steps=3), 2),
    (dict(axis="routing", values="", model="mcl", steps=3), len(MENU_ROUTINGS)),  # the menu's routings
    (dict(axis="routing", values="expert:0, expert:2, gated", model="mcl", steps=3), 3),  # others by name
    (dict(axis="guidance", values="0, 4", model="cfg", steps=3), 2),
])
def test_compare(client, kwargs, rows):
    path, js = client.predict(**kwargs, api_name="/compare")
    meta = json.loads(js)
    assert meta["axis"] == kwargs["axis"] and len(meta["rows"]) == rows
    img = decode_png(Path(path).read_bytes())
    assert img.ndim == 3 and img.shape[0] > 28 * rows
    again, _ = client.predict(**kwargs, api_name="/compare")
    assert Path(again).read_bytes() == Path(path).read_bytes()


def test_streaming_endpoint_yields_frames(client, app_log):
    job = client.submit("cfg", "3", 2.0, "euler", 6, 0.0, "gated", "5", 1, 2.0, "ddpm_weak", "output", api_name="/generate_stream")
    try:
        job.result(timeout=120)
    except Exception as e:  # noqa: BLE001 - show what the server said
        pytest.fail(f"/generate_stream failed: {e}\nserver log:\n{_log_tail(app_log)}")
    outputs = job.outputs()
    assert len(outputs) >= 3  # the noise frame, the final image, the extras (live frames are throttled)
    final = [o for o in outputs if o[3] is not None]
    assert final, "no update carried the final image"


BAD = [
    (dict(steps=0), "steps must be between 1 and 1000"),
    (dict(steps=1_000_000), "steps must be between 1 and 1000"),
    (dict(guidance="nan"), "guidance must be a finite number"),
    (dict(guidance=-1), "guidance must be between 0 and 20"),
    (dict(guidance=1e12), "guidance must be between 0 and 20"),
    (dict(digit=11), "digit must be between 0 and 9"),
    (dict(sampler="warp"), "unknown sampler 'warp'"),
    (dict(model="mcl", routing="teleport"), "unknown routing 'teleport'"),
    (dict(model="mcl", routing="expert:3"), "expert index must be in 0..2"),
    (dict(seed=2**64 + 5), "seed must be between 0 and 2^63-1"),
    (dict(n=17), "number of images must be between 1 and 16"),
    (dict(model="/etc/passwd"), "unknown model"),
    (dict(model="ddpm", autoguidance="nan"), "autoguidance must be a finite number"),
    (dict(model="ddpm", autoguidance=-0.1), "autoguidance must be between 0 and 5"),
    (dict(model="ddpm", autoguidance=5.5), "autoguidance must be between 0 and 5"),
    (dict(model="ddpm", autoguidance=2, guide="nosuch"), "unknown guide model 'nosuch'"),
    (dict(model="ddpm", autoguidance=2, guide="../checkpoints/ddpm"), "unknown guide model"),
]


def test_bad_input_gives_clear_errors_and_server_keeps_answering(client):
    for kwargs, message in BAD:
        with pytest.raises(Exception) as e:
            client.predict(**dict({"steps": 2}, **kwargs), api_name="/generate")
        assert message in str(e.value), (kwargs, str(e.value))
    for bad_json, message in [("{", "not valid JSON"), ('{"steps": 0}', "steps must be between"), ('{"colour": 1}', "unknown settings")]:
        with pytest.raises(Exception, match=message):
            client.predict(settings_json=bad_json, api_name="/generate_from_settings")
    for kwargs, message in [(dict(axis="routing", model="cfg"), "needs the MCL model"), (dict(axis="guidance", values="1, inf"), "finite"),
                            (dict(axis="sampler", values=",".join(["euler"] * 13)), "at most 12")]:
        with pytest.raises(Exception, match=message):
            client.predict(**dict({"steps": 2}, **kwargs), api_name="/compare")
    path, js = client.predict(steps=2, api_name="/generate")  # still answering
    assert Path(path).is_file() and Settings.from_json(js).steps == 2


def test_autoguidance_through_the_api(client, registry):
    """The API's default for an unconditional model is the app's autoguidance; the settings JSON says so and replays it."""
    path, js = client.predict(model="ddpm", steps=3, seed=8, n=2, api_name="/generate")
    s = Settings.from_json(js)
    assert (s.autoguidance, s.guide) == (APP_AUTOGUIDANCE["ddpm"], "ddpm_weak")
    model, guide = registry.get("ddpm"), registry.get("ddpm_weak")
    expected = generate(Settings(**s.to_dict()), model, guide=guide).images.numpy()
    assert np.array_equal(split_grid(decode_png(Path(path).read_bytes()), 2), expected)
    path1, js1 = client.predict(model="ddpm", steps=3, seed=8, n=2, autoguidance=1, api_name="/generate")
    assert Settings.from_json(js1).autoguidance == 1.0 and Path(path1).read_bytes() != Path(path).read_bytes()
    path2, _ = client.predict(settings_json=js, api_name="/generate_from_settings")
    assert Path(path2).read_bytes() == Path(path).read_bytes()
    png, cjs = client.predict(axis="autoguidance", values="1, 3", model="ddpm", steps=3, api_name="/compare")
    assert [r["autoguidance"] for r in json.loads(cjs)["rows"]] == [1.0, 3.0]


def test_autoguide_through_the_api(client, registry):
    """mcl_parts' app defaults are its own (weight 3 of its experts' mixture), not its kind's: an empty
    autoguidance gives both; a weight given without autoguide is of the output, as before autoguide
    existed; the settings JSON replays; mixture on a model without one is refused."""
    w, of = APP_AUTOGUIDANCE_OF_MODEL["mcl_parts"]
    path, js = client.predict(model="mcl_parts", steps=3, seed=4, n=2, api_name="/generate")
    s = Settings.from_json(js)
    assert (s.autoguidance, s.autoguide, s.guide) == (w, of, "ddpm_weak")
    assert np.array_equal(split_grid(decode_png(Path(path).read_bytes()), 2), _expected(registry, s))
    _, js_mcl = client.predict(model="mcl_shared", steps=3, seed=4, n=2, api_name="/generate")  # the kind's default: off
    assert Settings.from_json(js_mcl).autoguidance == APP_AUTOGUIDANCE["mcl"] == 1.0
    path_out, js_out = client.predict(model="mcl_parts", steps=3, seed=4, n=2, autoguidance=w, api_name="/generate")
    assert Settings.from_json(js_out).autoguide == "output" and Path(path_out).read_bytes() != Path(path).read_bytes()
    _, js_mix = client.predict(model="mcl_parts", steps=3, seed=4, n=2, autoguidance=2, autoguide="mixture", api_name="/generate")
    assert (Settings.from_json(js_mix).autoguidance, Settings.from_json(js_mix).autoguide) == (2.0, "mixture")
    path2, _ = client.predict(settings_json=js, api_name="/generate_from_settings")
    assert Path(path2).read_bytes() == Path(path).read_bytes()
    _, cjs = client.predict(axis="autoguidance", values="1, 2", model="mcl_parts", steps=3, autoguide="mixture", api_name="/compare")
    assert [(r["autoguidance"], r.get("autoguide", "output")) for r in json.loads(cjs)["rows"]] == [(1.0, "output"), (2.0, "mixture")]
    for kwargs, message in [(dict(model="ddpm", autoguidance=2, autoguide="mixture"), "use autoguide=output"),
                            (dict(model="mcl_parts", autoguidance=2, autoguide="both"), "autoguide must be one of")]:
        with pytest.raises(Exception, match=message):
            client.predict(**dict({"steps": 2}, **kwargs), api_name="/generate")


def test_settings_json_replays_with_the_sampling_cli(client, tiny_checkpoints, tmp_path):
    from diffusion_core import sample

    path, js = client.predict(model="cfg", digit="4", n=2, steps=3, seed=77, api_name="/generate")
    (tmp_path / "settings.json").write_text(js)
    out = tmp_path / "replay.npz"
    assert sample.main(["--settings", str(tmp_path / "settings.json"), "--out", str(out), "--checkpoint-dir", str(tiny_checkpoints)]) == 0
    with np.load(out) as z:
        assert np.array_equal(z["images"], split_grid(decode_png(Path(path).read_bytes()), 2))
