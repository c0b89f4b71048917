"""Unit tests of diffusion_core.ui (the app's logic) on tiny random checkpoints; no browser, no server."""
from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.pipeline import Settings, generate, to_uint8
from diffusion_core.pipeline import initial_noise as pipeline_initial_noise
from diffusion_core.ui.common import (
    GAP,
    MENU_ROUTINGS,
    parse_settings,
    routing_choices,
    routing_help,
    settings_from_json,
    visibility,
)
from diffusion_core.ui.compare_tab import compare, parse_compare
from diffusion_core.ui.files import OutputFiles, png_files
from diffusion_core.ui.generate_tab import Throttle, generate_image, stream
from diffusion_core.ui.glue import carry_forward, user_errors
from diffusion_core.ui.models_tab import model_card, model_cards
from diffusion_core.ui.render import (
    Recording,
    decode_png,
    expert_usage,
    filmstrip,
    frame_scale,
    gif_frames,
    grid_shape,
    mean_gate_probs,
    png_bytes,
    render_grid,
    snapshot_indices,
    split_grid,
    upscale,
    vp_frame,
    write_gif,
)
from diffusion_core.ui.share import settings_from_query, share_query


def test_available_models_and_visibility(models):
    assert list(models) == ["ddpm", "cfg", "mcl", "mcl_shared"]
    assert models["cfg"].conditional and not models["ddpm"].conditional
    assert models["mcl"].is_mcl and models["mcl"].num_experts == 3 and not models["mcl"].shared
    assert models["mcl_shared"].is_mcl and models["mcl_shared"].num_experts == 3 and models["mcl_shared"].shared
    v = visibility(models["cfg"], "dpmpp_2m")
    assert (v.digit, v.guidance, v.routing, v.eta) == (True, True, False, False)
    v = visibility(models["mcl"], "ddim")
    assert (v.digit, v.guidance, v.routing, v.eta, v.num_experts) == (False, False, True, True, 3)
    assert [c[1] for c in routing_choices(3)] == list(MENU_ROUTINGS)


def test_routing_menu_offers_the_menu_routings_with_a_sentence_and_its_cost():
    from diffusion_core.mcl import ROUTING_HELP, ROUTINGS

    offered = [value for _, value in routing_choices(2)]
    assert offered == list(MENU_ROUTINGS) and set(offered) <= set(ROUTINGS)
    assert Settings().routing in offered and not any(v.startswith("expert:") for v in offered)
    # a share link's routing outside the menu joins it, so that the link still reproduces
    assert routing_choices(2, keep="expert:1")[-1] == ("expert 1 only", "expert:1")
    assert routing_choices(2, keep="sticky:0.5")[-1][1] == "sticky:0.5"
    assert [v for _, v in routing_choices(2, keep="expert:5")] == offered  # no expert 5 among two
    assert [v for _, v in routing_choices(2, keep=offered[0])] == offered
    for value in offered:
        key = "expert:K" if value.startswith("expert:") else value
        text = routing_help(value)
        assert text.startswith(ROUTING_HELP[key]) and "per image per step" in text
    assert "K expert evaluations" in routing_help("soft") and "Cost: 1 expert evaluation per" in routing_help("gated")
    assert routing_help("sticky:0.5") == routing_help("sticky")
    assert routing_help("nonsense") == "Which expert denoises each image at each step."


def test_defaults_are_pipeline_defaults(models):
    assert parse_settings(models) == Settings().validate()


@pytest.mark.parametrize("fields", [
    dict(model="cfg", digit=7, guidance=3.5, sampler="heun", steps=12, seed=2**63 - 1, n=16),
    dict(model="cfg", digit="any", guidance=0.0, sampler="ddim", eta=0.3, steps=1, seed=5, n=3),
    dict(model="mcl", routing="expert:2", sampler="ddpm", steps=1000, seed=12345678901234, n=2),
    dict(model="mcl", routing="soft", sampler="ddim", eta=1.0, steps=7, seed=0, n=1),
    dict(model="ddpm", sampler="euler", steps=33, seed=99, n=5),
])
def test_share_link_round_trip(models, fields):
    s = parse_settings(models, **fields)
    query = share_query(s, models[s.model])
    assert query.startswith("?v=1&model=")
    back, notes = settings_from_query(models, query)
    assert back == s and notes == []
    # also as the mapping / pairs Gradio's Request gives
    assert settings_from_query(models, "http://host/space" + query + "#frag")[0] == s


def test_share_link_ignores_foreign_parameters(models):
    assert settings_from_query(models, "") == (None, [])
    assert settings_from_query(models, "?__theme=dark&view=api") == (None, [])
    s, notes = settings_from_query(models, {"model": "ddpm", "steps": "5", "__sign": "jwt", "utm_source": "x"})
    assert s.model == "ddpm" and s.steps == 5
    assert len(notes) == 1 and "utm_source" in notes[0]


@pytest.mark.parametrize("query, words", [
    ("?v=1&model=cfg&steps=abc", "steps must be an integer"),
    ("?model=cfg&steps=0", "steps must be between 1 and 1000"),
    ("?model=cfg&steps=1000000", "steps must be between 1 and 1000"),
    ("?model=cfg&digit=11", "digit must be between 0 and 9"),
    ("?model=cfg&guidance=nan", "guidance must be a finite number"),
    ("?model=cfg&guidance=-1", "guidance must be between 0 and 20"),
    ("?model=cfg&seed=18446744073709551617", "seed must be between 0 and 2^63-1"),
    ("?model=cfg&n=17", "number of images must be between 1 and 16"),
    ("?model=cfg&sampler=magic", "unknown sampler 'magic'"),
    ("?model=mcl&routing=expert:9", "expert index must be in 0..2"),
    ("?model=mcl&routing=wat", "unknown routing 'wat'"),
    ("?model=gpt&steps=3", "unknown model 'gpt'"),
    ("?model=cfg&steps=3&steps=4", "'steps' is given more than once"),
    ("?v=2&model=cfg", "version '2' is not supported"),
    ("?model=cfg&seed=" + "9" * 5000, "seed is too long"),
])
def test_malformed_share_links(models, query, words):
    with pytest.raises(ValueError) as e:
        settings_from_query(models, query)
    assert "share link is malformed" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("fields, words", [
    (dict(steps=0), "steps must be between 1 and 1000, got 0"),
    (dict(steps=1e6), "steps must be between 1 and 1000"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance="inf"), "guidance must be a finite number"),
    (dict(guidance=-0.5), "guidance must be between 0 and 20"),
    (dict(guidance=1e9), "guidance must be between 0 and 20"),
    (dict(digit=11), "digit must be between 0 and 9, got 11"),
    (dict(digit=float("nan")), "digit must be between 0 and 9"),
    (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(sampler=3), "sampler must be a name"),
    (dict(model="mcl", routing="nope"), "unknown routing 'nope'"),
    (dict(seed=2**64 + 1), "seed must be between 0 and 2^63-1"),
    (dict(seed=-1), "seed must be between 0 and 2^63-1"),
    (dict(n=17), "number of images must be between 1 and 16"),
    (dict(n=0), "number of images must be between 1 and 16"),
    (dict(eta=2), "eta must be between 0 and 1"),
    (dict(model="../../etc/passwd"), "unknown model"),
])
def test_validation_messages(models, fields, words):
    with pytest.raises(ValueError, match=None) as e:
        parse_settings(models, **fields)
    assert words in str(e.value)


def test_settings_are_canonical(models):
    s = parse_settings(models, model="ddpm", digit=3, guidance=5, routing="soft", eta=0.5, sampler="euler")
    assert (s.digit, s.guidance, s.routing, s.eta) == (None, Settings().guidance, Settings().routing, 0.0)
    s = parse_settings(models, model="cfg", digit="4", seed="  17 ", steps="8", n=2.0, sampler="DDIM", eta="0.25")
    assert (s.digit, s.seed, s.steps, s.n, s.sampler, s.eta) == (4, 17, 8, 2, "ddim", 0.25)
    assert settings_from_json(models, s.to_json()) == s
    with pytest.raises(ValueError, match="not valid JSON"):
        settings_from_json(models, "{")


def test_user_errors_wraps_functions_and_generators():
    import gradio as gr

    @user_errors
    def bad(x):
        raise ValueError(f"bad {x}")

    @user_errors
    def bad_gen():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(gr.Error, match="bad 3"):
        bad(3)
    g = bad_gen()
    assert next(g) == 1
    with pytest.raises(gr.Error, match="internal error.*boom"):
        next(g)


def test_carry_forward_repeats_every_output_set_so_far():
    chunks = [{"a": None, "b": 1}, {"c": "x"}, {"b": 2}, {}]
    out = list(carry_forward(iter(chunks)))
    assert out == [{"a": None, "b": 1}, {"a": None, "b": 1, "c": "x"}, {"a": None, "b": 2, "c": "x"}, {"a": None, "b": 2, "c": "x"}]
    assert chunks[0] == {"a": None, "b": 1}  # the inputs are not changed
    assert out[0] is not out[1]  # each chunk is a dict of its own


def test_png_files_writes_uint8_images_and_leaves_the_rest(tmp_path):
    files = OutputFiles(tmp_path)
    img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    rgb = np.zeros((4, 6, 3), np.uint8)
    out = png_files({"a": img, "b": [rgb, "keep.gif"], "c": None, "d": np.zeros(3, np.float32)}, files)
    assert np.array_equal(decode_png(out["a"]), img) and np.array_equal(decode_png(out["b"][0]), rgb)
    assert Path(out["a"]).read_bytes() == png_bytes(img)  # the bytes the CLI writes
    assert out["b"][1] == "keep.gif" and out["c"] is None and out["d"].dtype == np.float32
    again = png_files((img,), files)
    assert isinstance(again, tuple) and again[0] == out["a"]  # the same image, the same file


def test_grid_upscale_and_split_round_trip():
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 5, 16):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        rows, cols = grid_shape(n)
        assert rows * cols >= n and cols - rows in (0, 1)
        grid = render_grid(imgs)
        assert grid.shape == (rows * 224 + (rows - 1) * GAP, cols * 224 + (cols - 1) * GAP)
        assert np.array_equal(split_grid(grid, n), imgs)
        assert np.array_equal(split_grid(decode_png(png_bytes(grid)), n), imgs)
    up = upscale(imgs[0], 3)
    assert up.shape == (84, 84) and np.array_equal(up[::3, ::3], imgs[0]) and np.array_equal(up[2::3, 1::3], imgs[0])
    framed = render_grid(imgs[:2], 2, border=["#0072B2", None], border_width=3)
    assert framed.shape == (56 + 6, 2 * 56 + GAP + 6, 3)
    assert tuple(framed[0, 0]) == (0, 0x72, 0xB2)


def test_throttle():
    t = [0.0]
    th = Throttle(0.1, clock=lambda: t[0])
    passed = []
    for _ in range(20):
        passed.append(th.ready())
        t[0] += 0.03
    assert passed[0] and sum(passed) == 5  # t = 0, 0.12, 0.24, 0.36, 0.48
    assert th.ready(force=True)


def _run(registry, models, **fields):
    s = parse_settings(models, **fields)
    updates = list(stream(registry, s, models[s.model], min_interval=0.0))
    return s, updates


@pytest.mark.parametrize("fields", [
    dict(model="cfg", digit=None, n=3, steps=5, seed=1),
    dict(model="mcl", routing="soft", n=2, steps=4, seed=2),
    dict(model="mcl", routing="heuristic", n=1, steps=3, sampler="heun"),
    dict(model="ddpm", steps=3, sampler="ddpm", seed=3),
])
def test_stream_final_image_is_pipeline_output(registry, models, fields):
    s, updates = _run(registry, models, **fields)
    # noise frame, steps-1 live frames (throttle off), the final update, the extras
    assert len(updates) == 1 + (s.steps - 1) + 2
    assert updates[0]["denoised"] is None and "Pure noise" in updates[0]["status"]
    final = updates[-2]
    model, gate = registry.for_settings(s)
    expected = generate(Settings(**s.to_dict()), model, gate).images.numpy()
    assert np.array_equal(split_grid(final["final"], s.n), expected)
    assert Settings.from_json(final["settings_json"]) == s
    assert settings_from_query(models, final["share_query"])[0] == s
    extras = updates[-1]
    assert extras["filmstrip"].ndim == 3 and extras["filmstrip"].shape[2] == 3
    with Image.open(extras["gif"]) as gif:
        frames = gif.n_frames
    assert 2 <= frames <= 1 + s.steps  # noise + every step (PIL merges identical consecutive frames)
    assert [p.rsplit("/", 1)[-1] for p in extras["downloads"]] == ["samples.png", "trajectory.gif", "settings.json"]
    assert np.array_equal(split_grid(decode_png(open(extras["downloads"][0], "rb").read()), s.n), expected)
    if s.model == "mcl":
        fig = extras["chart"]  # the gate's panel under every routing (the gating checkpoint is there)
        assert len(fig.axes) == 2
        gate_title = fig.axes[1].get_title(loc="left")
        assert gate_title.startswith("gating probabilities") if s.routing == "soft" else "not used by heuristic routing" in gate_title
    else:
        assert extras["chart"] is None


def test_generate_image_is_deterministic(registry, models):
    s = parse_settings(models, model="cfg", digit=5, n=2, steps=3, seed=11)
    a = png_bytes(generate_image(registry, s, models["cfg"]))
    b = png_bytes(generate_image(registry, s, models["cfg"]))
    assert a == b


def test_expert_chart_data():
    experts = np.array([[0, 0, 1, 2], [1, 1, 1, 1], [2, 0, 2, 2]])
    shares = expert_usage(experts, 3)
    assert np.allclose(shares, [[0.5, 0.25, 0.25], [0, 1, 0], [0.25, 0, 0.75]])
    assert np.allclose(shares.sum(1), 1)
    probs = np.zeros((2, 2, 3))
    probs[0, 0] = [1, 0, 0]
    probs[0, 1] = [0, 1, 0]
    probs[1, :] = [0.2, 0.3, 0.5]
    assert np.allclose(mean_gate_probs(probs), [[0.5, 0.5, 0], [0.2, 0.3, 0.5]])


def test_filmstrip_and_gif_shapes():
    rng = np.random.default_rng(1)
    S, n = 20, 3
    rec = Recording(noise=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                       x=[rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for _ in range(S)],
                       denoised=[rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for _ in range(S)],
                       sigmas=list(np.linspace(10, 0, S)), experts=rng.integers(0, 3, (S, n)), gate_probs=None, num_experts=3)
    strip = filmstrip(rec, columns=8)
    assert strip.shape[2] == 3 and strip.shape[1] > strip.shape[0]  # 8 columns, 3 rows
    assert snapshot_indices(S, 7) == [0, 3, 6, 10, 13, 16, 19]
    frames = gif_frames(rec, max_frames=10)
    assert len(frames) == 11 and frames[0].shape == frames[-1].shape and frames[0].ndim == 3
    data = write_gif(frames)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 11 and gif.info.get("loop") == 0


def test_compare(registry, models):
    base = parse_settings(models, model="mcl", steps=4, seed=3)
    rows = parse_compare(models, base, "routing", "expert:0, gated, gated, pooled")
    assert [r.routing for r in rows] == ["expert:0", "gated", "pooled"] and all(r.n == 1 for r in rows)
    img, meta = compare(registry, rows, "routing", columns=5)
    assert img.ndim == 3 and img.shape[0] > img.shape[1] / 3 and meta["axis"] == "routing" and len(meta["rows"]) == 3
    img2, _ = compare(registry, rows, "routing", columns=5)
    assert np.array_equal(img, img2)
    cfg = parse_settings(models, model="cfg", steps=3, digit=2)
    assert [r.guidance for r in parse_compare(models, cfg, "guidance", None)] == [0, 1, 2, 4, 8]
    assert [r.sampler for r in parse_compare(models, cfg, "sampler", ["euler", "heun"])] == ["euler", "heun"]
    with pytest.raises(ValueError, match="needs the MCL model"):
        parse_compare(models, cfg, "routing", "gated")
    with pytest.raises(ValueError, match="class-conditional"):
        parse_compare(models, parse_settings(models, model="ddpm"), "guidance", "1, 2")
    with pytest.raises(ValueError, match="compare value 'nan'.*finite"):
        parse_compare(models, cfg, "guidance", "1, nan")
    with pytest.raises(ValueError, match="at most 12"):
        parse_compare(models, cfg, "guidance", ",".join(str(g) for g in range(13)))
    with pytest.raises(ValueError, match="unknown compare axis"):
        parse_compare(models, cfg, "colour", "red")


def test_model_cards(registry):
    html = model_cards(registry)
    for name in ("DDPM", "CFG", "MCL", "Gating network", "Classifier"):
        assert name in html
    card = model_card("mcl", registry.available()["mcl"])
    overview = dict(card["sections"][0][1])
    assert int(overview["parameters"].replace(",", "")) == registry.get("mcl").num_parameters
    assert overview["experts"] == "3" and "ddpm_eps" in overview["objective"]
    assert dict(card["sections"][1][1])["note"] == "tiny random test model"


def test_model_card_training_rows(tmp_path):
    """What a card says of training comes from the checkpoint's metadata, labelled for what it is."""
    from diffusion_core.checkpoints import save_checkpoint

    training = {"wall_time_s": 437.1, "device": "CPU", "init": "checkpoints/cfg.safetensors", "epochs": 1, "steps": 400,
                "images": 60000, "images_seen": 51200, "batch_size": 128, "lr": 5e-4}
    path = save_checkpoint(tmp_path / "ddpm.safetensors", {"net.w": torch.zeros(3)}, {"model": "ddpm", "training": training})
    rows = dict(dict(model_card("ddpm", path)["sections"])["Training"])
    assert rows["training time"] == "7.3 min" and rows["started from"] == "cfg.safetensors"
    assert rows["optimizer steps"] == "400" and rows["images seen"] == "51,200" and rows["learning rate"] == "0.0005"


def test_output_files(tmp_path):
    files = OutputFiles(tmp_path)
    a = files.write("x.json", b"{}")
    assert files.write("x.json", b"{}") == a and open(a, "rb").read() == b"{}"
    assert files.write("x.json", b"[]") != a


def test_output_files_sweep_old_folders_but_not_one_just_handed_out(tmp_path):
    """A file written an hour ago (say by an earlier run of the app) and asked for again must
    survive the next sweep; one nobody asked for again is removed."""
    files = OutputFiles(tmp_path, max_age_s=60)
    again, stale = Path(files.write("compare.png", b"grid")), Path(files.write("old.png", b"old"))
    old = time.time() - 3600
    for p in (again, again.parent, stale, stale.parent):
        os.utime(p, (old, old))
    assert files.write("compare.png", b"grid") == str(again)  # the same bytes: handed out again
    files._last_sweep = 0.0  # the next write sweeps
    files.write("new.png", b"new")
    assert again.read_bytes() == b"grid"
    assert not stale.exists() and not stale.parent.exists()


def test_the_first_frame_is_the_pipelines_starting_noise(registry, models):
    s = parse_settings(models, model="ddpm", steps=2, seed=42, n=2)
    expected = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(42))
    noise, _ = pipeline_initial_noise(s)
    assert torch.equal(noise, expected)
    first = next(stream(registry, s, models["ddpm"], extras=False))
    assert np.array_equal(first["noisy"], render_grid(to_uint8(expected).numpy(), frame_scale(2)))
    assert math.isclose(float(vp_frame(torch.zeros(1, 1, 28, 28), 3.0).mean()), 127.5, abs_tol=0.6)


def test_model_card_history_shows_the_loss_curve_and_grids_or_says_there_is_none(tmp_path):
    import base64
    import io

    from PIL import Image

    from diffusion_core.checkpoints import save_checkpoint
    from diffusion_core.ui.models_tab import card_html, model_card

    buf = io.BytesIO()
    Image.new("L", (20, 10), 128).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    history = {"loss": [[50, 0.9], [100, 0.5], [150, 0.3]], "grids": [{"epoch": 1, "step": 10, "png": png}, {"epoch": 5, "png": "<script>"}]}
    path = save_checkpoint(tmp_path / "ddpm.safetensors", {"net.w": torch.zeros(3)}, {"model": "ddpm", "training": {"history": history}})
    html = card_html(model_card("ddpm", path))
    assert "How it learned" in html and "<polyline" in html and html.count("<img") == 1  # the non-base64 grid is left out
    assert f"data:image/png;base64,{png}" in html and "after epoch 1" in html and "<script>" not in html
    old = save_checkpoint(tmp_path / "cfg.safetensors", {"net.w": torch.zeros(3)}, {"model": "cfg", "training": {}})
    assert "no training history recorded" in card_html(model_card("cfg", old))
