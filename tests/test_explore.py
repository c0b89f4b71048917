"""diffusion_core.explore and the Explore/Compare/link logic of diffusion_core.ui, without a server:
schedules against their definitions, the velocity derived from the denoiser against the flow
network's own output, SDEdit's start level, inpainting, drawings, links, the eta axis, and the
model menu picking up a new checkpoint."""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from explore_fixtures import add_tiny_flow, checkpoints_with_flow  # noqa: E402

from diffusion_core import explore as ex  # noqa: E402
from diffusion_core.models import load_model  # noqa: E402
from diffusion_core.pipeline import build_denoiser  # noqa: E402
from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.samplers import get_sigmas  # noqa: E402
from diffusion_core.ui.common import available_models, model_choices, parse_settings  # noqa: E402
from diffusion_core.ui.compare_tab import compare, compare_from_json, compare_json, compare_share_query, parse_compare, row_value  # noqa: E402
from diffusion_core.ui.explore_tab import edit_share_query, parse_edit, sdedit_image  # noqa: E402
from diffusion_core.ui.generate_tab import generate_image  # noqa: E402
from diffusion_core.ui.links import parse_link  # noqa: E402
from diffusion_core.ui.models_tab import model_cards  # noqa: E402
from diffusion_core.ui.render import split_grid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoints, tmp_path_factory):
    return checkpoints_with_flow(tiny_checkpoints, tmp_path_factory.mktemp("with_flow"))


@pytest.fixture(scope="module")
def registry(ckpts):
    return ModelRegistry(ckpts)


def test_shipped_test_digits_are_mnist(mnist_root):
    from diffusion_core.data import load_mnist

    x, y = load_mnist(mnist_root, train=False, download=False)
    images, labels = ex.test_digits()
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, ((x[:1000, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    assert np.array_equal(labels, y[:1000].numpy())


def test_schedules_match_their_definitions():
    lin = ex.display_scale("linear")
    for t in (0.1, 0.5, 0.9):
        k = round(t * 999)  # at whole timesteps the level is the schedule's alpha-bar exactly
        tt = k / 999
        a, b = lin.coefficients(tt)
        assert a * a == pytest.approx(float(lin.schedule.alphas_cumprod[k]), rel=1e-9)
        assert a * a + b * b == pytest.approx(1.0)
    flow = ex.display_scale("flow")
    assert flow.coefficients(0.3) == (0.7, 0.3) and flow.sigma(0.5) == 1.0 and flow.sigma(1.0) == math.inf
    x0, eps = torch.rand(1, 1, 28, 28) * 2 - 1, torch.randn(1, 1, 28, 28)
    assert torch.allclose(ex.forward(x0, eps, 0.25, flow), 0.75 * x0 + 0.25 * eps)
    assert torch.equal(ex.forward(x0, eps, 0.0, lin), x0) and torch.equal(ex.forward(x0, eps, 1.0, flow), eps)
    cos = ex.display_scale("cosine")
    c = cos.curves()
    assert np.all(np.diff(c["signal"]) <= 1e-12) and c["signal"][0] == pytest.approx(1, abs=1e-4)
    assert cos.level_of_sigma(cos.sigma(0.37)) == pytest.approx(0.37, abs=1e-6)
    with pytest.raises(ValueError, match="noise level must be between 0 and 1"):
        ex.forward(x0, eps, 1.2, lin)


def test_velocity_from_the_denoiser_is_the_flow_networks_velocity(ckpts):
    model = load_model("flow", directory=ckpts)
    den = model.objective.denoiser(model.net)
    x0, eps = torch.rand(2, 1, 28, 28) * 2 - 1, torch.randn(2, 1, 28, 28)
    label = torch.tensor([3, 7])
    for t in (0.2, 0.6, 0.9):
        sigma = t / (1 - t)
        x = x0 + sigma * eps  # sigma space; the network sees x_t = x / (1 + sigma) = (1 - t) x0 + t eps
        with torch.no_grad():
            v_net = model.net(x / (1 + sigma), torch.full((2,), 1000 * t), label)
            v = ex.velocity(x, den(x, sigma, label), sigma)
        assert torch.allclose(v, v_net, atol=1e-4), t


def test_sdedit_starts_at_the_closest_grid_level_and_inpainting_keeps_the_rest(registry, models):
    es = parse_edit(models, model="cfg", digit=8, index=4, level=0.5, steps=10, sampler="euler")
    model, gate = registry.for_settings(es.base())
    den = build_denoiser(es.base(), model, gate)
    start, _ = ex.sdedit_start(es, model, den)
    full = get_sigmas("euler", den, 10)
    target = ex.model_scale(model).sigma(0.5)
    i = int(np.argmin(np.abs(np.log(full[:-1].numpy()) - math.log(target))))
    assert torch.equal(start.sigmas, full[i:]) and 0 < i < 10
    eps, _ = ex.noise(es.seed)
    assert torch.allclose(start.x, ex.to_model_space(ex.test_digit(4)) + float(full[i]) * eps)
    painted = parse_edit(models, model="cfg", digit=8, index=4, level=1.0, steps=6, region="top")
    out = split_grid(sdedit_image(registry, painted, models["cfg"]), 1)[0]
    assert np.abs(out[14:].astype(int) - ex.test_digit(4)[14:].astype(int)).max() <= 1  # the bottom half is kept
    assert np.abs(out[:14].astype(int) - ex.test_digit(4)[:14].astype(int)).max() > 10  # the top half is repainted


def test_drawings_become_mnist_style_digits():
    canvas = np.full((280, 280, 3), 255, dtype=np.uint8)  # a black vertical bar on white
    canvas[40:240, 130:150] = 0
    d = ex.digit_from_drawing(canvas)
    assert d.dtype == np.uint8 and d.shape == (28, 28)
    ys, xs = np.nonzero(d > 30)
    assert ys.max() - ys.min() + 1 in (20, 21) and abs((ys.mean() + 0.0) - 13.5) < 1.5 and abs(xs.mean() - 13.5) < 1.5
    layer = np.zeros((280, 280, 4), dtype=np.uint8)  # a transparent layer with an opaque stroke
    layer[40:240, 130:150] = (0, 0, 0, 255)
    assert np.array_equal(ex.digit_from_drawing({"composite": layer}), d)
    assert np.array_equal(ex.decode_digit(ex.encode_digit(d)), d)
    for empty in (np.full((100, 100, 3), 255, np.uint8), np.zeros((50, 50, 4), np.uint8), None, {"composite": None, "background": None}):
        with pytest.raises(ValueError, match="the drawing is empty"):
            ex.digit_from_drawing(empty)
    for bad in ("", "%%%", "eJw", ex.encode_digit(d)[:-4], "A" * 5000):
        with pytest.raises(ValueError, match="the drawing is malformed"):
            ex.decode_digit(bad)


def test_links_round_trip_and_malformed_links(models):
    es = parse_edit(models, model="flow", digit=2, guidance=3.5, index=None, source="drawing",
                       drawing=ex.encode_digit(ex.test_digit(9)), level=0.35, region="left", steps=7, seed=123)
    link = parse_link(models, "http://host/app" + edit_share_query(es, models["flow"]))
    assert link.tab == "explore" and link.edit == es
    base = parse_settings(models, model="mcl", routing="pooled", steps=5, seed=4, n=1)
    rows = parse_compare(models, base, "routing", "heuristic, expert:1, pooled")
    link = parse_link(models, compare_share_query(base, models["mcl"], "routing", rows))
    assert link.tab == "compare" and link.rows == rows and link.settings == base
    assert parse_link(models, "").is_plain and parse_link(models, "?__theme=dark").is_plain
    for query, message in [("?v=1&tab=compare&model=cfg", "needs its values"), ("?v=1&tab=explore&model=cfg&level=0.5", "either index or drawing"),
                           ("?v=1&tab=explore&model=cfg&index=1&drawing=x", "either index or drawing"),
                           ("?v=1&tab=compare&model=cfg&axis=colour&values=1", "unknown compare axis"),
                           ("?v=1&tab=explore&index=1&index=2", "given more than once")]:
        with pytest.raises(ValueError, match="this share link is malformed") as e:
            parse_link(models, query)
        assert message in str(e.value), query


def test_eta_axis_puts_ddpm_beside_ddim(registry, models):
    base = parse_settings(models, model="cfg", digit=5, steps=6, seed=3)
    rows = parse_compare(models, base, "eta", None)
    assert [row_value(s, "eta") for s in rows] == ["0.0", "0.25", "0.5", "1.0", "ddpm", "ddpm_nonoise"]
    assert [s.sampler for s in rows] == ["ddim"] * 4 + ["ddpm", "ddpm_nonoise"]
    assert parse_compare(models, base, "eta", rows_text := "ddpm_nonoise, 0")[0].sampler == "ddpm_nonoise", rows_text
    img, meta = compare(registry, rows, "eta")
    from diffusion_core.pipeline import Settings, trajectory

    def states(s):  # every state of the row's trajectory
        model, gate = registry.for_settings(s)
        return [step.x for step in trajectory(Settings(**s.to_dict()), model, gate)]

    eta0, eta1, ddpm = states(rows[0]), states(rows[3]), states(rows[4])
    assert all(torch.equal(a, b) for a, b in zip(eta1, ddpm))  # DDIM at eta 1 is DDPM's sampler, step for step
    assert not torch.equal(eta0[-1], eta1[-1])  # the added noise changes the result from one seed
    again, _, rows2, _ = compare_from_json(models, compare_json(meta))
    assert rows2 == rows


def test_menus_list_the_checkpoints_that_exist(tiny_checkpoints, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, d)
    reg = ModelRegistry(d)
    assert list(available_models(reg)) == ["ddpm", "cfg", "mcl", "mcl_shared"]
    add_tiny_flow(d)  # the flow model lands: it appears, in its place in the menu
    add_tiny_flow(d, name="flow_v2")
    models = available_models(reg)
    assert list(models) == ["ddpm", "cfg", "flow", "mcl", "mcl_shared", "flow_v2"]
    assert models["flow"].is_flow and models["flow"].conditional
    assert dict(model_choices(models))["Flow matching (choose a digit)"] == "flow"
    assert ("flow_v2 (flow matching, choose a digit)", "flow_v2") in model_choices(models)
    assert model_cards(reg).count('class="model-card"') == 9  # ddpm_weak and mcl_shared included
    s = parse_settings(models, model="flow_v2", digit=1, steps=2)
    assert generate_image(reg, s, models["flow_v2"]).shape == (224, 224)


@pytest.mark.parametrize("T", ex.SCHEDULE_LENGTHS)
def test_linear_schedules_of_every_length_end_near_alphabar_1e5_and_are_plotted(T):
    from diffusion_core.ui.explore_tab import forward_view, schedule_figure

    sched = ex.display_scale("linear", T).schedule
    assert len(sched.betas) == T
    final = float(sched.alphas_cumprod[-1])
    assert 0.5e-5 < final < 2e-5, final
    assert float(sched.betas[-1]) / float(sched.betas[0]) == pytest.approx(200)  # linear, 1e-4 .. 0.02 scaled
    _, info = forward_view(ex.test_digit(1), 0, 1.0, T)
    assert info["schedules"]["linear"]["signal"] == pytest.approx(final) and info["schedules"]["linear"]["T"] == T
    fig = schedule_figure(0.3, T)
    beta_line = fig.axes[0].get_lines()[0]
    assert len(beta_line.get_ydata()) == T and np.allclose(beta_line.get_ydata(), sched.betas.numpy())
    assert "beta_t" in fig.axes[0].get_title(loc="left") and "alpha-bar" in fig.axes[1].get_title(loc="left")


def test_schedule_length_is_checked():
    from diffusion_core.ui.explore_tab import schedule_length

    assert schedule_length(None) == 1000 and schedule_length("5000") == 5000
    for bad in (300, 0, "many", True, 200.5, float("nan")):
        with pytest.raises(ValueError, match="schedule length T must be one of 200, 1000, 5000"):
            schedule_length(bad)
