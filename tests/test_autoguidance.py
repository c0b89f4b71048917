"""Autoguidance (guidance without labels): the wrapper's exact limits, its settings, share links and
the CLI. The app's API and its bad inputs are in test_app_api.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_core.denoisers import Denoiser
from diffusion_core.guidance import AutoguidanceDenoiser
from diffusion_core.pipeline import APP_AUTOGUIDANCE, MAX_AUTOGUIDANCE, Settings, build_denoiser, generate, trajectory
from diffusion_core.registry import ModelRegistry
from diffusion_core.sample import main as sample_main
from diffusion_core.ui.common import parse_settings
from diffusion_core.ui.compare_tab import compare, compare_from_json, compare_json, parse_compare
from diffusion_core.ui.generate_tab import generate_image, stream
from diffusion_core.ui.render import png_bytes
from diffusion_core.ui.share import settings_from_query


def _batch(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 28, 28), generator=g) * 3
    sigma = torch.tensor([0.02, 0.3, 1.0, 5.0, 80.0])[:n]
    return x, sigma


@pytest.mark.parametrize("kind", ["ddpm", "mcl"])
def test_weight_one_is_the_good_model_and_zero_the_bad_one_exactly(registry, kind):
    good = registry.get(kind)
    bad = registry.get("ddpm_weak")
    x, sigma = _batch()
    s = Settings(model=kind, routing="heuristic")
    plain = build_denoiser(s, good, None)
    weak = bad.denoiser()
    for w, expected in ((1.0, plain(x, sigma)), (0.0, weak(x, sigma))):
        den = build_denoiser(Settings(model=kind, routing="heuristic", autoguidance=w, guide="ddpm_weak"), good, None, guide=bad)
        assert torch.equal(den(x, sigma), expected)
    # in between: D_bad + w (D_good - D_bad), and the good model's MCL records pass through
    den = build_denoiser(Settings(model=kind, routing="heuristic", autoguidance=2.5, guide="ddpm_weak"), good, None, guide=bad)
    out = den(x, sigma)
    torch.testing.assert_close(out, weak(x, sigma) + 2.5 * (plain(x, sigma) - weak(x, sigma)))
    if kind == "mcl":
        assert den.last_expert is not None and den.last_expert.shape == (5,)


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 3.7, MAX_AUTOGUIDANCE])
def test_a_model_guided_by_itself_is_the_model(registry, w):
    model = registry.get("ddpm")
    x, sigma = _batch(1)
    den = AutoguidanceDenoiser(model.denoiser(), model.denoiser(), w)
    assert torch.equal(den(x, sigma), model.denoiser()(x, sigma))
    # and through the whole pipeline: the same images as without autoguidance
    plain = generate(Settings(model="ddpm", steps=4, n=3, seed=5), model)
    guided = generate(Settings(model="ddpm", steps=4, n=3, seed=5, autoguidance=w, guide="ddpm"), model, guide=model)
    assert torch.equal(plain.images, guided.images)


def test_a_class_conditional_guide_serves_its_unconditional_branch(registry):
    model, guide = registry.get("ddpm"), registry.get("cfg")
    x, sigma = _batch(2)
    null = torch.full((5,), 10, dtype=torch.long)
    expected = guide.objective.denoiser(guide.net)(x, sigma, null)
    assert torch.equal(guide.guide_denoiser()(x, sigma), expected)
    den = model.denoiser(autoguidance=0.0, guide=guide)
    assert torch.equal(den(x, sigma), expected)


def test_the_denoiser_refuses_what_it_cannot_do(registry):
    with pytest.raises(ValueError, match="finite"):
        AutoguidanceDenoiser(Denoiser(), Denoiser(), math.nan)
    with pytest.raises(ValueError, match="unconditional models"):
        registry.get("cfg").denoiser(guidance=2.0, autoguidance=2.0, guide=registry.get("ddpm_weak"))
    with pytest.raises(ValueError, match="needs a guide"):
        registry.get("ddpm").denoiser(autoguidance=2.0)
    with pytest.raises(ValueError, match="cannot guide"):
        registry.get("mcl").guide_denoiser()


@pytest.mark.parametrize("value, message", [
    (math.nan, "autoguidance must be a finite number"),
    ("nan", "autoguidance must be a finite number"),
    (-0.5, "autoguidance must be between 0 and"),
    (MAX_AUTOGUIDANCE + 0.1, "autoguidance must be between 0 and"),
    ("lots", "autoguidance must be a number"),
])
def test_bad_weights_are_refused_with_a_message(models, value, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(models, model="ddpm", autoguidance=value)


def test_unknown_guides_are_refused_and_defaults_are_canonical(models):
    with pytest.raises(ValueError, match="unknown guide model 'nosuch'"):
        parse_settings(models, model="ddpm", autoguidance=2, guide="nosuch")
    with pytest.raises(ValueError, match="unknown guide model"):
        parse_settings(models, model="ddpm", autoguidance=2, guide="/etc/passwd")  # no paths from the web
    with pytest.raises(ValueError, match="unknown guide model 'mcl'"):
        parse_settings(models, model="ddpm", autoguidance=2, guide="mcl")  # an ensemble is no guide
    s = parse_settings(models, model="ddpm", autoguidance=2)
    assert (s.autoguidance, s.guide) == (2.0, "ddpm_weak")  # the default guide, written out
    s = parse_settings(models, model="ddpm", autoguidance=1, guide="cfg")
    assert (s.autoguidance, s.guide) == (1.0, "")  # off: no guide
    s = parse_settings(models, model="cfg", autoguidance=3, guide="ddpm_weak")
    assert (s.autoguidance, s.guide) == (1.0, "")  # does not apply to a class-conditional model


def test_share_links_with_autoguidance_reproduce_the_image_byte_for_byte(registry, models):
    s = parse_settings(models, model="ddpm", autoguidance=APP_AUTOGUIDANCE["ddpm"], guide="ddpm_weak", steps=4, n=3, seed=11)
    info = models["ddpm"]
    updates = list(stream(registry, s, info, min_interval=0.0))
    final = next(u for u in updates if "final" in u)
    query = final["share_query"]
    assert f"autoguidance={APP_AUTOGUIDANCE['ddpm']!r}" in query and "guide=ddpm_weak" in query
    back, notes = settings_from_query(models, query)
    assert back == s and not notes
    assert png_bytes(generate_image(registry, back, info)) == png_bytes(final["final"])
    # and autoguidance changes the image (the weak model is another network)
    off = parse_settings(models, model="ddpm", steps=4, n=3, seed=11)
    assert not np.array_equal(generate_image(registry, off, info), final["final"])
    # a link made before autoguidance existed (no such field) is the model alone, as it was
    old, _ = settings_from_query(models, "?v=1&model=ddpm&sampler=dpmpp_2m&steps=4&seed=11&n=3")
    assert old.autoguidance == 1.0 and np.array_equal(generate_image(registry, old, info), generate_image(registry, off, info))


def test_compare_axis_autoguidance(registry, models):
    base = parse_settings(models, model="ddpm", steps=4, seed=3, n=1)
    rows = parse_compare(models, base, "autoguidance", "1, 2, 0")
    assert [r.autoguidance for r in rows] == [1.0, 2.0, 0.0] and [r.guide for r in rows] == ["", "ddpm_weak", "ddpm_weak"]
    img, meta = compare(registry, rows, "autoguidance", base=base)
    assert meta["values"] == ["1.0", "2.0", "0.0"]
    again = compare(registry, *compare_from_json(models, compare_json(meta))[2:3], "autoguidance", base=base)[0]
    assert np.array_equal(img, again)
    with pytest.raises(ValueError, match="needs an unconditional model"):
        parse_compare(models, parse_settings(models, model="cfg"), "autoguidance", "1, 2")


def test_compare_autoguidance_from_weight_one_keeps_what_the_guide_is_compared_with(registry, models):
    """A base at weight 1 is unguided and keeps only autoguide=output; the rows of an autoguidance
    comparison still compare the guide with the mixture when asked, and its JSON and link say so."""
    from diffusion_core.ui.compare_tab import compare_share_query
    from diffusion_core.ui.links import parse_link

    base = parse_settings(models, model="mcl_shared", steps=3, seed=5, n=1, autoguidance=1, autoguide="mixture")
    assert base.autoguide == "output"  # weight 1: nothing to compare
    rows = parse_compare(models, base, "autoguidance", "1, 2", autoguide="mixture")
    assert [(r.autoguidance, r.autoguide) for r in rows] == [(1.0, "output"), (2.0, "mixture")]
    img, meta = compare(registry, rows, "autoguidance", base=base)
    assert meta["autoguide"] == "mixture"
    _, _, replay, _ = compare_from_json(models, compare_json(meta))
    assert [r.autoguide for r in replay] == ["output", "mixture"]
    assert np.array_equal(img, compare(registry, replay, "autoguidance", base=base)[0])
    link = parse_link(models, compare_share_query(base, models["mcl_shared"], "autoguidance", rows))
    assert [r.autoguide for r in link.rows] == ["output", "mixture"]
    # differently guided from the rows compared with the output: the mixture is what changed
    plain = parse_compare(models, base, "autoguidance", "1, 2")
    assert [r.autoguide for r in plain] == ["output", "output"]
    assert not np.array_equal(img, compare(registry, plain, "autoguidance", base=base)[0])
    # the field only where the base cannot say it, so comparisons and links without it replay as before
    _, meta_plain = compare(registry, plain, "autoguidance", base=base)
    assert "autoguide" not in meta_plain and "autoguide" not in compare_share_query(base, models["mcl_shared"], "autoguidance", plain)
    guided = parse_settings(models, model="mcl_shared", steps=3, seed=5, n=1, autoguidance=2, autoguide="mixture")
    rows3 = parse_compare(models, guided, "autoguidance", "1, 3")
    assert [r.autoguide for r in rows3] == ["output", "mixture"] and "autoguide" not in compare(registry, rows3, "autoguidance", base=guided)[1]
    for bad in ({"autoguide": 3}, {"autoguide": "both"}):
        with pytest.raises(ValueError, match="autoguide"):
            compare_from_json(models, compare_json(dict(meta, **bad)))
    with pytest.raises(ValueError, match="use autoguide=output"):  # a model without a mixture
        parse_compare(models, parse_settings(models, model="ddpm", steps=3), "autoguidance", "1, 2", autoguide="mixture")


def test_trajectory_with_autoguidance_is_deterministic(registry):
    s = Settings(model="ddpm", sampler="ddpm", steps=5, n=2, seed=4, autoguidance=2.0, guide="ddpm_weak")
    model, guide = registry.get("ddpm"), registry.get("ddpm_weak")
    a = [st.x for st in trajectory(Settings(**s.to_dict()), model, guide=guide)]
    b = [st.x for st in trajectory(Settings(**s.to_dict()), model, guide=guide)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == 5


def test_cli_autoguidance_and_its_bad_values(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "a.npz"
    common = ["--checkpoint-dir", str(tiny_checkpoints), "--model", "ddpm", "--steps", "3", "--n", "2"]
    assert sample_main(common + ["--out", str(out)]) == 0  # no flag: the app's weight
    with np.load(out) as z:
        assert Settings.from_json(str(z["settings"])).autoguidance == APP_AUTOGUIDANCE["ddpm"]
    assert sample_main(common + ["--autoguidance", "2", "--out", str(out)]) == 0
    with np.load(out) as z:
        s = Settings.from_json(str(z["settings"]))
        images = z["images"]
    assert (s.autoguidance, s.guide) == (2.0, "")
    registry = ModelRegistry(tiny_checkpoints)
    expected = generate(Settings(**s.to_dict()), registry.get("ddpm"), guide=registry.get("ddpm_weak")).images.numpy()
    assert np.array_equal(images, expected)
    for flags, message in ((["--autoguidance", "nan"], "finite"), (["--autoguidance", "-1"], "between 0 and"),
                           (["--autoguidance", "9"], "between 0 and"), (["--autoguidance", "2", "--guide", "nosuch"], "nosuch"),
                           (["--autoguidance", "2", "--guide", "mcl"], "a guide is one of")):
        capsys.readouterr()
        assert sample_main(common + flags + ["--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    cond = ["--checkpoint-dir", str(tiny_checkpoints), "--model", "cfg", "--autoguidance", "2", "--out", str(out)]
    assert sample_main(cond) == 2 and "unconditional models" in capsys.readouterr().err
    # --autoguide mixture: an MCL on one trunk, the same images as generate; refused where there is no mixture
    mix = ["--checkpoint-dir", str(tiny_checkpoints), "--model", "mcl_shared", "--steps", "3", "--n", "2", "--autoguidance", "2",
           "--autoguide", "mixture", "--out", str(out)]
    assert sample_main(mix) == 0
    with np.load(out) as z:
        s = Settings.from_json(str(z["settings"]))
        images = z["images"]
    assert s.autoguide == "mixture"
    assert np.array_equal(images, generate(s, registry.get("mcl_shared"), guide=registry.get("ddpm_weak")).images.numpy())
    capsys.readouterr()
    assert sample_main(common + ["--autoguidance", "2", "--autoguide", "mixture", "--out", str(out)]) == 2
    assert "experts on one network" in capsys.readouterr().err


@pytest.mark.parametrize("query, message", [
    ("?v=1&model=ddpm&autoguidance=nan&guide=ddpm_weak&seed=1&n=1", "autoguidance must be a finite number"),
    ("?v=1&model=ddpm&autoguidance=-2&guide=ddpm_weak&seed=1&n=1", "autoguidance must be between 0 and 5"),
    ("?v=1&model=ddpm&autoguidance=9&seed=1&n=1", "autoguidance must be between 0 and 5"),
    ("?v=1&model=ddpm&autoguidance=2&guide=elsewhere&seed=1&n=1", "unknown guide model 'elsewhere'"),
])
def test_malformed_autoguidance_links_say_why(models, query, message):
    with pytest.raises(ValueError, match=f"this share link is malformed: {message}"):
        settings_from_query(models, query)


# ----------------------------------------------------------------------------- of the experts' mixture


class _Fixed(Denoiser):
    """A denoiser that returns a fixed tensor (and, as an MCL on one trunk does, records a mixture)."""

    def __init__(self, out, mixture=None):
        super().__init__()
        self.out, self.records_mixture = out, mixture is not None
        self.last_mixture = mixture

    def forward(self, x, sigma, label=None):
        return self.out


def test_autoguidance_of_the_mixture_scales_only_the_mixture_against_the_guide():
    g = torch.Generator().manual_seed(3)
    d_k, d_mix, d_bad = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    x, sigma = torch.zeros(2, 1, 4, 4), torch.tensor([1.0, 2.0])
    for w in (0.0, 1.5, 2.5):
        out = AutoguidanceDenoiser(_Fixed(d_k, d_mix), _Fixed(d_bad), w, of="mixture")(x, sigma)
        # D_bad + w (D_mix - D_bad), plus the expert's offset D_k - D_mix unscaled
        assert torch.allclose(out, d_bad + w * (d_mix - d_bad) + (d_k - d_mix), atol=1e-6)
        plain = AutoguidanceDenoiser(_Fixed(d_k, d_mix), _Fixed(d_bad), w)(x, sigma)
        assert torch.allclose(plain, d_bad + w * (d_k - d_bad), atol=1e-6)
    # where the expert is the mixture (soft routing), both are ordinary autoguidance
    same = AutoguidanceDenoiser(_Fixed(d_mix, d_mix), _Fixed(d_bad), 2.0, of="mixture")(x, sigma)
    assert torch.allclose(same, d_bad + 2.0 * (d_mix - d_bad), atol=1e-6)
    with pytest.raises(ValueError, match="experts on one network"):
        AutoguidanceDenoiser(_Fixed(d_k), _Fixed(d_bad), 2.0, of="mixture")
    with pytest.raises(ValueError, match="acts on one of output, mixture"):
        AutoguidanceDenoiser(_Fixed(d_k, d_mix), _Fixed(d_bad), 2.0, of="image")


def test_autoguidance_of_the_mixture_on_a_shared_mcl_against_its_hypotheses(registry):
    """The test mcl_shared: one expert served, guided through the score-weighted mixture of all
    hypotheses, each evaluated on its own (the heads alone, the score head for the weights)."""
    good, bad = registry.get("mcl_shared"), registry.get("ddpm_weak")
    x, sigma = _batch(seed=4)
    w = 2.5
    den = build_denoiser(Settings(model="mcl_shared", routing="expert:2", autoguidance=w, guide="ddpm_weak", autoguide="mixture"),
                         good, None, guide=bad)
    heads = [e(x, sigma) for e in good.denoiser(routing="expert:0").experts]
    probs = good.denoiser(routing="soft").gate_probs(x, sigma)
    mixture = sum(probs[:, k, None, None, None] * heads[k] for k in range(len(heads)))
    expected = heads[2] + (w - 1) * (mixture - bad.denoiser()(x, sigma))
    assert torch.allclose(den(x, sigma), expected, atol=1e-4)


def test_autoguide_in_settings_links_and_json(registry, models):
    old = Settings(model="mcl_shared", autoguidance=2.5, guide="ddpm_weak")
    assert "autoguide" not in old.to_json()  # the settings of before it keep their JSON
    s = parse_settings(models, model="mcl_shared", autoguidance=2.5, autoguide="mixture", n=2, steps=4)
    assert s.autoguide == "mixture" and '"autoguide": "mixture"' in s.to_json()
    from diffusion_core.ui.share import share_query

    query = share_query(s, models["mcl_shared"])
    assert "autoguide=mixture" in query
    back, _ = settings_from_query(models, query)
    assert back == s
    assert "autoguide" not in share_query(parse_settings(models, model="mcl_shared", autoguidance=2.5, n=2), models["mcl_shared"])
    # off without autoguidance; refused where there is no mixture
    assert parse_settings(models, model="mcl_shared", autoguide="mixture").autoguide == "output"
    with pytest.raises(ValueError, match="experts' mixture of an MCL model on one network"):
        parse_settings(models, model="ddpm", autoguidance=2.5, autoguide="mixture")
    with pytest.raises(ValueError, match="autoguide must be one of output, mixture"):
        parse_settings(models, model="mcl_shared", autoguidance=2.5, autoguide="image")
    a = generate(s, registry.get("mcl_shared"), None, guide=registry.get("ddpm_weak")).images
    b = generate(Settings.from_json(s.to_json()), registry.get("mcl_shared"), None, guide=registry.get("ddpm_weak")).images
    plain = generate(parse_settings(models, model="mcl_shared", autoguidance=2.5, n=2, steps=4), registry.get("mcl_shared"), None,
                     guide=registry.get("ddpm_weak")).images
    assert torch.equal(a, b) and not torch.equal(a, plain)
