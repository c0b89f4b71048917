import json
import math
import shutil
import time
from dataclasses import replace

import pytest
import torch
from explore_fixtures import add_tiny_flow

from diffusion_core import metrics
from diffusion_core.data import load_mnist
from diffusion_core.denoisers import Denoiser
from diffusion_core.evaluate import cli, config, diagnosis, figures, reference, report, run, sampling, scores
from diffusion_core.models import load_model
from diffusion_core.palette import EXPERT_COLORS, expert_color
from diffusion_core.pipeline import Settings
from diffusion_core.samplers import SAMPLERS, get_sampler, karras_sigmas

G = f"{Settings().guidance:g}"  # the app's default guidance: the CFG headline row is "cfg g=<G>"

# ----------------------------------------------------------------------------- helpers with known answers


class CountingDenoiser(Denoiser):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma, label=None):
        self.calls += 1
        return 0.5 * x


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_nfe_counts_denoiser_calls(sampler, steps):
    den = CountingDenoiser()
    sigmas = karras_sigmas(steps, 0.01, 10.0)
    x = torch.randn(2, 1, 4, 4)
    for _ in get_sampler(sampler)(den, x, sigmas, None, torch.Generator().manual_seed(0)):
        pass
    assert den.calls == config.nfe(sampler, steps)


def test_batch_settings_split_and_seeds():
    s = Settings(model="cfg", sampler="ddim", steps=3, seed=7, n=25, guidance=3.0)
    batches = config.batch_settings(s, 10)
    assert [b.n for b in batches] == [10, 10, 5]
    assert [b.seed for b in batches] == [7, 8, 9]
    assert all(replace(b, n=s.n, seed=s.seed) == s for b in batches)
    assert [b.n for b in config.batch_settings(s, 100)] == [25]


def test_expert_usage_by_sigma_known_fractions():
    sigmas = [0.1, 10.0, 1.0]  # any order in, decreasing out
    experts = torch.tensor([[2, 2, 2, 0], [0, 0, 0, 0], [1, 1, 2, 2]])
    s, frac = diagnosis.expert_usage_by_sigma(sigmas, experts, 3)
    assert torch.allclose(s, torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    expected = torch.tensor([[1, 0, 0], [0, 0.5, 0.5], [0.25, 0, 0.75]], dtype=torch.float64)
    assert torch.allclose(frac, expected)
    assert torch.allclose(frac.sum(1), torch.ones(3, dtype=torch.float64))


def test_expert_usage_by_sigma_pools_equal_levels_and_bins():
    # Two steps at the same sigma are one point.
    s, frac = diagnosis.expert_usage_by_sigma([2.0, 2.0], torch.tensor([[0, 0], [1, 1]]), 2)
    assert s.tolist() == [2.0] and frac.tolist() == [[0.5, 0.5]]
    # Four levels 1e3, 1e2, 1e1, 1e0 in two log bins: {1e3, 1e2} and {1e1, 1e0}.
    sig = [1e3, 1e2, 1e1, 1e0]
    exp = torch.tensor([[0, 0], [0, 1], [2, 2], [2, 1]])
    s, frac = diagnosis.expert_usage_by_sigma(sig, exp, 3, bins=2)
    assert torch.allclose(s, torch.tensor([10**2.25, 10**0.75], dtype=torch.float64))
    assert torch.allclose(frac, torch.tensor([[0.75, 0.25, 0], [0, 0.25, 0.75]], dtype=torch.float64))
    # Random routing: every row of fractions sums to 1, and counts are recovered.
    e = torch.randint(0, 4, (9, 50), generator=torch.Generator().manual_seed(0))
    s, frac = diagnosis.expert_usage_by_sigma(torch.logspace(2, -2, 9), e, 4, bins=4)
    assert torch.allclose(frac.sum(1), torch.ones(len(s), dtype=torch.float64))
    with pytest.raises(ValueError):
        diagnosis.expert_usage_by_sigma([1.0], torch.zeros(2, 3, dtype=torch.long), 2)


def test_usage_bin_edges_are_geometric_midpoints():
    edges = figures.usage_bin_edges(torch.tensor([100.0, 10.0, 1.0]))
    assert torch.allclose(edges, torch.tensor([10**2.5, 10**1.5, 10**0.5, 10**-0.5], dtype=torch.float64))


def test_expert_usage_shares():
    assert scores.expert_usage(torch.tensor([[0, 1], [1, 1]]), 3) == [0.25, 0.75, 0.0]


def test_expand_routings_and_labels():
    assert config.expand_routings(["experts", "expert_1", "gated", "gated"], 3) == ["expert:0", "expert:1", "expert:2", "gated"]
    assert config.routing_label("expert:2") == "expert_2"
    with pytest.raises(ValueError, match="expert index"):
        config.expand_routings(["expert:3"], 3)
    with pytest.raises(ValueError, match="unknown routing"):
        config.expand_routings(["best"], 3)


def test_every_routing_gets_a_row_by_default():
    rows = config.main_rows(config.EvalConfig(models=("mcl",), n=10), num_experts=2)
    assert [r.name for r in rows] == ["mcl expert_0", "mcl expert_1", "mcl heuristic", "mcl gated", "mcl soft", "mcl pooled",
                                      "mcl sampled", "mcl winrate", "mcl guided", "mcl x0gate", "mcl scout", "mcl sticky"]
    assert len({(r.settings.seed, r.settings.n, r.settings.sampler, r.settings.steps) for r in rows}) == 1  # same seed, same noise
    assert config.expand_routings(["all"], 2) == config.expand_routings(config.ALL_ROUTINGS, 2)
    assert config.expand_routings(["sticky:0.5", "pooled", "all"], 2)[:3] == ["sticky:0.5", "pooled", "expert:0"]
    assert config.specs_need_gate(["all"]) and config.specs_need_gate(["experts", "x0gate"]) and config.specs_need_gate(["sticky:2"])
    assert not config.specs_need_gate(["experts", "expert_1", "heuristic", "pooled", "winrate"])
    with pytest.raises(ValueError, match="sticky:SIGMA"):
        config.expand_routings(["sticky:later"], 2)


# --- MCL diagnosis: known answers on synthetic inputs -------------------------------------------


def test_winner_shares_and_entropy_by_hand():
    winners = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 2]])
    shares = diagnosis.winner_shares(winners, 3)
    assert shares.tolist() == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
    h = diagnosis.normalized_entropy(shares)
    assert h[0] == 0.0
    assert h[1].item() == pytest.approx(math.log(2) / math.log(3))
    assert h[2].item() == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(3))
    assert diagnosis.normalized_entropy(torch.full((2, 4), 0.25)).tolist() == pytest.approx([1.0, 1.0])


def test_winner_share_by_digit_by_hand():
    winners = torch.tensor([[0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])  # two levels, six examples
    labels = torch.tensor([3, 3, 5, 5, 5, 7])
    d = diagnosis.winner_share_by_digit(winners, labels, num_experts=3, num_classes=10)
    assert d.shape == (2, 10, 3)
    assert d[0, 3].tolist() == [0.5, 0.5, 0.0]  # the two 3s: one won by expert 0, one by expert 1
    assert d[0, 5].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert d[0, 7].tolist() == [0.0, 0.0, 1.0]
    assert d[1, 7].tolist() == [1.0, 0.0, 0.0] and d[1, 5].tolist() == [0.0, 1.0, 0.0]
    assert d[0, 0].tolist() == [0.0, 0.0, 0.0]  # no zeros among the examples


def test_gate_summary_by_hand():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.9, 0.1], [0.2, 0.8]]])  # (S=2, N=2, K=2)
    winners = torch.tensor([[1, 0], [0, 0]])
    g = diagnosis.gate_summary(probs, winners)
    torch.testing.assert_close(g["mean_probs"], torch.tensor([[0.75, 0.25], [0.55, 0.45]], dtype=torch.float64))
    assert g["accuracy"].tolist() == [0.5, 0.5]  # argmax of [0.5, 0.5] is expert 0; the first sample's winner is 1
    assert g["majority"].tolist() == [0.5, 1.0]  # level 0: experts 1 and 0 win once each; level 1: expert 0 twice
    h01 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    h28 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(2)
    assert g["entropy"].tolist() == pytest.approx([0.5, (h01 + h28) / 2])


class ScaledDenoiser(Denoiser):
    """D(x, sigma) = a * x / (1 + sigma^2): the exact denoiser of N(0, 1) data when a = 1."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, sigma, label=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.a * x / (1 + s**2)


def test_expert_losses_pick_the_exact_denoiser():
    """On Gaussian data the exact denoiser (a = 1) wins at every level; a scaled copy loses; losses
    match the closed form E|D(x) - x0|^2 = sigma^2 / (1 + sigma^2) for the exact one."""
    x0 = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sigmas = diagnosis.diagnosis_levels(0.1, 10.0, 3)
    assert sigmas.tolist() == pytest.approx([10.0, 1.0, 0.1])

    class Gate(torch.nn.Module):  # logits favour expert 1 above sigma 1, expert 0 otherwise
        def forward(self, x, sigma):
            big = (torch.as_tensor(sigma).reshape(-1) > 1).float()
            return torch.stack([1 - big, big], dim=1).expand(x.shape[0], 2) * 5

    losses, probs = diagnosis.expert_losses([ScaledDenoiser(0.5), ScaledDenoiser(1.0)], x0, sigmas, torch.Generator().manual_seed(1), batch_size=150, gate=Gate())
    assert losses.shape == probs.shape == (3, 400, 2)
    exact = losses[:, :, 1].mean(dim=1)
    assert exact.tolist() == pytest.approx([s**2 / (1 + s**2) for s in sigmas.tolist()], rel=0.02)
    winners = losses.argmin(dim=2)
    assert (winners[1:] == 1).all(), "at sigma 1 and 0.1 the exact denoiser wins every example"
    assert (winners[0] == 1).double().mean() > 0.6  # at sigma 10 both predict nearly 0: a close race
    acc = diagnosis.gate_summary(probs, winners)["accuracy"]  # the gate picks expert 1 at sigma 10 only
    assert acc.tolist() == [(winners[0] == 1).double().mean().item(), 0.0, 0.0]


def test_specialisation_summary_names_what_each_expert_wins():
    diag = {"n": 4, "sigmas": [10.0, 0.1], "num_experts": 2, "winner_share": [[1.0, 0.0], [0.25, 0.75]],
            "winner_entropy": [0.0, 0.81], "winner_share_overall": [0.625, 0.375],
            "winner_share_by_digit": [[[1.0, 0.0]] * 10, [[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5], "digit_counts": [1] * 10,
            "gate": {"mean_probs": [[0.9, 0.1], [0.5, 0.5]], "entropy": [0.47, 1.0], "accuracy": [1.0, 0.25]}}
    lines = diagnosis.specialisation_summary(diag)
    assert lines[0].startswith("expert 0: wins 62% of (example, level) pairs; most at sigma 10 (100%); its digits: 5 (100% of them)")
    assert lines[1].startswith("expert 1: wins 38% of (example, level) pairs; most at sigma 0.1 (75%); its digits: 0 (50% of them)")
    assert "0.00 to 0.81" in lines[2]
    assert lines[3].startswith("gate: picks the winner for 62% of examples on average (chance 50%), 100% at the noisiest level and 25% at the cleanest")
    md = diagnosis.diagnosis_markdown(diag)
    assert "| 10 | 1.00 | 0.00 | 0.00 | 0.90 | 0.10 | 0.47 | 1.00 |" in md
    for fig in (figures.plot_gate_sigma(diag), figures.plot_winner_digits(diag), figures.plot_gate_sigma(dict(diag, gate=None))):
        assert len(fig.axes) >= 2


def test_column_steps():
    assert diagnosis.column_steps(4, 8) == [0, 1, 2, 3]
    cols = diagnosis.column_steps(16, 8)
    assert cols[0] == 0 and cols[-1] == 15 and len(cols) == 8 and cols == sorted(set(cols))


def test_autoguidance_rows_follow_the_routings_they_are_given():
    """MCL autoguidance rows: one per weight of the default routing, or of each routing named in
    ``autoguidance_routings``, each with that routing, the weight and the guide in its settings."""
    cfg = config.EvalConfig(models=("mcl",), routings=("soft",), n=10, autoguidance=(1.0, 2.5))
    assert [(r.name, r.settings.routing) for r in config.main_rows(cfg, num_experts=2)] == [
        ("mcl soft", "soft"), ("mcl sampled ag=2.5 ddpm_weak", "sampled")]
    cfg = replace(cfg, autoguidance_routings=("winrate", "soft"))
    rows = config.main_rows(cfg, num_experts=2)
    assert [r.name for r in rows] == ["mcl soft", "mcl winrate ag=2.5 ddpm_weak", "mcl soft ag=2.5 ddpm_weak"]
    assert [(r.settings.routing, r.settings.autoguidance, r.settings.guide) for r in rows[1:]] == [
        ("winrate", 2.5, "ddpm_weak"), ("soft", 2.5, "ddpm_weak")]
    with pytest.raises(ValueError, match="unknown routing"):
        config.main_rows(replace(cfg, autoguidance_routings=("best",)), num_experts=2)


def test_main_rows_names_and_settings():
    cfg = config.EvalConfig(guidance_scales=(1.0, 3.0), routings=("experts", "soft"), n=20, steps=5, samplers=("heun", "ddim"))
    rows = config.main_rows(cfg, num_experts=2)
    assert [r.name for r in rows] == ["ddpm", "cfg g=1", "cfg g=3", "flow g=1", "flow g=3", "mcl expert_0", "mcl expert_1", "mcl soft"]
    assert all(r.settings.sampler == "heun" and r.settings.steps == 5 and r.settings.n == 20 for r in rows)
    assert rows[2].settings.guidance == 3.0 and rows[4].settings.model == "flow" and rows[7].settings.routing == "soft"
    sweep = config.sweep_rows(replace(cfg, sweep_steps=(4, 2), sweep_n=10))
    assert [(r.settings.sampler, r.settings.steps) for r in sweep] == [("heun", 2), ("heun", 4), ("ddim", 2), ("ddim", 4)]


def test_palette_one_colour_per_expert():
    assert len(set(EXPERT_COLORS)) == len(EXPERT_COLORS)
    assert expert_color(1) == EXPERT_COLORS[1] and expert_color(len(EXPERT_COLORS)) == EXPERT_COLORS[0]


def test_inception_message_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert reference.find_inception_weights() is None
    msgs = []
    model, note = reference.load_inception("cpu", msgs.append)
    assert model is None and msgs == [note]
    assert "never downloads" in note and str(tmp_path / "hub") in note


@pytest.mark.slow
def test_inception_features_from_local_weights(tmp_path, monkeypatch):
    """With a weights file in the hub cache (random weights here), features are 2048-d and finite."""
    from torchvision.models import inception_v3

    (tmp_path / "checkpoints").mkdir()
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "checkpoints" / "inception_v3_google-0cc3c7bd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, note = reference.load_inception("cpu", lambda msg: None)
    assert model is not None and "inception_v3_google" in note
    f = model(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


# ----------------------------------------------------------------------------- real data and a full small run


@pytest.mark.slow
def test_real_floor_is_computed_from_real_data(tiny_checkpoints, mnist_root):
    clf = load_model(tiny_checkpoints / "classifier.safetensors")
    ref = reference.reference_features(clf, mnist_root, max_train=60, seed=3)
    floor = reference.real_floor(ref, 50, k=3)
    # Recompute from the MNIST files: the same seeded training draw, against the whole test set.
    train_x, _ = load_mnist(mnist_root, train=True)
    test_x, test_y = load_mnist(mnist_root, train=False)
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(len(train_x), generator=g)[:50]
    order = torch.randperm(len(test_x), generator=g)
    f_train = metrics.classify(clf.net, train_x[idx])["features"]
    f_test = metrics.classify(clf.net, test_x)["features"]
    assert len(ref.test_features) == 10000 and torch.equal(ref.test_labels, test_y)
    assert floor["n"] == 50
    assert floor["frechet"] == pytest.approx(metrics.frechet_distance(f_train, f_test), rel=1e-6)
    p, r = metrics.precision_recall(f_test[order[:50]], f_train, k=3)
    assert (floor["precision"], floor["recall"]) == (p, r)
    # Real digits are much closer to the test set than uniform noise images are.
    noise = torch.randint(0, 256, (50, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    f_noise = metrics.classify(clf.net, sampling.to_float(noise))["features"]
    assert 0 < floor["frechet"] < 0.5 * metrics.frechet_distance(f_noise, f_test)


N, STEPS, BATCH = 40, 3, 30  # two batches per main row (30 + 10)


@pytest.fixture(scope="module")
def small_run(tiny_checkpoints, mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    ckpt = shutil.copytree(tiny_checkpoints, out / "checkpoints")  # --record-quality writes to them
    add_tiny_flow(ckpt)
    argv = [
        "--checkpoint-dir", str(ckpt), "--data-dir", str(mnist_root), "--out-dir", str(out), "--record-quality",
        "--device", "cpu", "--n", str(N), "--steps", str(STEPS), "--batch-size", str(BATCH),
        "--samplers", "dpmpp_2m,heun", "--sweep-steps", "2,3", "--sweep-n", "20",
        "--guidance-scales", f"0,{G}", "--diversity-n", "20", "--usage-n", "16", "--seed", "5", "--diagnosis-n", "30", "--diagnosis-levels", "3",
    ]
    # A stand-in for InceptionV3 (which would need its weights and minutes on a CPU) to exercise
    # the --fid-inception wiring: features are a coarse subsampling of the pixels.
    def fake_inception(device="cpu", log=None):
        return (lambda images, batch_size=200: sampling.to_float(images)[:, 0, ::4, ::4].flatten(1)), "stand-in features"

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "load_inception", fake_inception)  # where the evaluation looks it up
        results = cli.main(argv + ["--fid-inception"])
    return results, out, time.perf_counter() - t0


@pytest.mark.slow  # the small evaluation run (small_run)
def test_small_run_rows_metrics_and_figures(small_run, capsys):
    results, out, _ = small_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    names = [r["name"] for r in on_disk["rows"]]
    assert names == ["ddpm", "cfg g=0", f"cfg g={G}", "flow g=0", f"flow g={G}", "mcl expert_0", "mcl expert_1", "mcl expert_2",
                     "mcl heuristic", "mcl gated", "mcl soft", "mcl pooled", "mcl sampled", "mcl winrate", "mcl guided", "mcl x0gate", "mcl scout", "mcl sticky"]
    mcl_rows = [r for r in on_disk["rows"] if r["group"] == "mcl"]
    assert [r["expert_evals_per_step"] for r in mcl_rows] == [1, 1, 1, 1, 1, 3, 1, 1, 1, 3, 1, 2, 1]
    diag = on_disk["mcl_diagnosis"]
    assert diag["n"] == 30 and len(diag["sigmas"]) == 3 and sum(diag["digit_counts"]) == 30
    assert all(sum(row) == pytest.approx(1) for row in diag["winner_share"] + diag["gate"]["mean_probs"])
    assert sum(diag["winner_share_overall"]) == pytest.approx(1) and all(0 <= a <= 1 for a in diag["gate"]["accuracy"])
    assert [(r["settings"]["sampler"], r["settings"]["steps"]) for r in on_disk["sweep"]] == [("dpmpp_2m", 2), ("dpmpp_2m", 3), ("heun", 2), ("heun", 3)]
    assert [r["nfe"] for r in on_disk["sweep"]] == [2, 3, 3, 5]
    floor = on_disk["floors"][str(N)]
    assert floor["n"] == N and floor["frechet"] > 0
    for r in on_disk["rows"] + on_disk["sweep"]:
        m = r["metrics"]
        for key in ("frechet", "frechet_floor", "frechet_ratio", "precision", "recall", "entropy", "confident"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (r["name"], key)
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["entropy"] <= 1
        assert m["frechet_ratio"] == pytest.approx(m["frechet"] / m["frechet_floor"])
        assert sum(m["histogram"]) == r["settings"]["n"]
        assert r["sample_seconds"] > 0 and r["nfe"] == config.nfe(r["settings"]["sampler"], r["settings"]["steps"])
        conditional = r["settings"]["model"] in ("cfg", "flow")
        assert (m["accuracy"] is not None) == conditional
        if r["settings"]["model"] == "mcl":
            assert len(m["expert_usage"]) == 3 and sum(m["expert_usage"]) == pytest.approx(1)
    rows = {r["name"]: r for r in on_disk["rows"]}
    assert rows["mcl expert_1"]["metrics"]["expert_usage"] == [0.0, 1.0, 0.0]
    assert [b["n"] for b in rows["ddpm"]["batches"]] == [30, 10] and [b["seed"] for b in rows["ddpm"]["batches"]] == [5, 6]
    assert set(on_disk["figures"]) == set(config.FIGURES)
    for path in on_disk["figures"].values():
        assert (out / path.split("/")[-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["inception"] == {"enabled": True, "note": "stand-in features"}
    assert all(math.isfinite(r["metrics"]["fid_inception"]) for r in on_disk["rows"])
    assert all("fid_inception" not in r["metrics"] for r in on_disk["sweep"])
    assert (out / "results.md").read_text().count("| mcl ") == 2 * 13  # the main table and the InceptionV3 FID table
    assert "MCL diagnosis: 30 MNIST test images noised at 3 levels" in (out / "results.md").read_text()


@pytest.mark.slow  # the small evaluation run (small_run)
def test_record_quality_reaches_the_model_cards(small_run, tiny_checkpoints, tmp_path):
    from diffusion_core.checkpoints import load_checkpoint
    from diffusion_core.ui.models_tab import model_card

    results, out, _ = small_run
    from diffusion_core.pipeline import APP_GUIDANCE

    expected = {"ddpm": "ddpm", "cfg": f"cfg g={G}", "mcl": f"mcl {Settings().routing}"}
    if f"{APP_GUIDANCE['flow']:g}" == G:  # flow's headline is its own default scale, a row only when it equals cfg's
        expected["flow"] = f"flow g={G}"
    assert results["recorded_quality"] == expected
    rows = {r["name"]: r for r in results["rows"]}
    for model, row in results["recorded_quality"].items():
        path = out / "checkpoints" / f"{model}.safetensors"
        q = load_checkpoint(path)[1]["quality"]
        assert q["Frechet distance"] == round(rows[row]["metrics"]["frechet"], 3)
        assert q["command"].startswith("python -m diffusion_core.evaluate") and "--record-quality" in q["command"]
        assert ("digit accuracy" in q) == (model in ("cfg", "flow"))
        # The tensors are those that were evaluated, unchanged.
        original = add_tiny_flow(tmp_path) if model == "flow" else tiny_checkpoints / f"{model}.safetensors"  # the same seeded weights
        new, old = load_checkpoint(path)[0], load_checkpoint(original)[0]
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
        card = dict(model_card(model, path)["sections"])["Measured quality"]
        assert ("Frechet distance", f"{q['Frechet distance']:.4g}") in card
    assert "quality" not in load_checkpoint(tiny_checkpoints / "cfg.safetensors")[1]  # the originals are untouched


@pytest.mark.slow  # the small evaluation run (small_run)
def test_small_run_prints_markdown_table(small_run, capsys):
    results, _, _ = small_run
    text = report.results_markdown(results)
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| row | sampler | steps | NFE | FD | FD floor | FD/floor")
    assert len(table) == 5 * 2 + 18 + 18 + 4 + 3 + 3  # headers + rules; rows; InceptionV3 FID rows; sweep rows; diagnosis levels; the gate against the noise-level-only predictor


@pytest.mark.slow  # the small evaluation run (small_run)
@pytest.mark.parametrize("name", [f"cfg g={G}", f"flow g={G}", "mcl pooled", "mcl gated", "mcl sampled", "mcl winrate", "mcl scout"])
def test_rows_replay_through_generate(small_run, tiny_checkpoints, name):
    results, out, _ = small_run
    row = next(r for r in results["rows"] if r["name"] == name)
    model = load_model(out / "checkpoints" / f"{row['settings']['model']}.safetensors")
    gate = load_model(tiny_checkpoints / "gating.safetensors").net
    images = sampling.replay_batches(row["batches"], model, gate)
    assert images.shape == (N, 28, 28)
    assert sampling.images_sha256(images) == row["images_sha256"]


def test_missing_gating_is_a_clear_error(tiny_checkpoints, tmp_path):
    for name in ("mcl", "classifier"):
        shutil.copy(tiny_checkpoints / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    base = ["--checkpoint-dir", str(tmp_path), "--models", "mcl", "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--quick"]
    with pytest.raises(SystemExit, match="gating checkpoint.*--routings"):
        cli.main(base)
    with pytest.raises(SystemExit, match="subset of ddpm,cfg,flow,mcl"):
        cli.main(base + ["--models", "gan"])


def test_default_batch_size_follows_the_device():
    parse = lambda *a: cli.config_from_args(cli.build_parser().parse_args(list(a)))  # noqa: E731
    assert parse("--device", "cpu").batch_size == cli.CPU_BATCH
    assert parse("--device", "cuda").batch_size == config.EvalConfig().batch_size == 1000
    assert parse("--device", "cpu", "--batch-size", "250").batch_size == 250


@pytest.mark.slow
def test_autoguidance_rows_and_the_second_classifier(tiny_checkpoints, mnist_root, tmp_path):
    """``--autoguidance`` adds a ddpm row per weight and guide (w = 0 draws exactly the guide's own
    images; rows replay with their guide); a ``classifier2`` checkpoint adds its own columns."""
    from diffusion_core.models import save_model
    from diffusion_core.nets import Classifier, ClassifierConfig
    from diffusion_core.pipeline import APP_AUTOGUIDANCE

    W = APP_AUTOGUIDANCE["ddpm"]
    ckpt = shutil.copytree(tiny_checkpoints, tmp_path / "checkpoints")
    torch.manual_seed(1)
    clf2 = Classifier(ClassifierConfig(channels=8, feature_dim=16, arch="gap")).eval()
    save_model(ckpt / "classifier2.safetensors", "classifier", [clf2], {"network": {"kind": "classifier", "config": clf2.config.to_dict()}, "training": {}})
    shutil.copy(ckpt / "ddpm_weak.safetensors", ckpt / "weak_copy.safetensors")
    results = cli.main(["--checkpoint-dir", str(ckpt), "--data-dir", str(mnist_root), "--out-dir", str(tmp_path / "out"), "--no-figures",
                       "--device", "cpu", "--models", "ddpm,cfg", "--guidance-scales", "2", "--n", "20", "--steps", "2", "--sweep-n", "0",
                       "--autoguidance", f"0,1,2.5,{W:g}", "--guides", f"ddpm_weak,cfg,{ckpt / 'weak_copy.safetensors'}", "--record-quality"])
    rows = {r["name"]: r for r in results["rows"]}
    weights = ["0", "2.5"] + ([f"{W:g}"] if W not in (0, 1, 2.5) else [])
    assert list(rows) == ["ddpm"] + [f"ddpm ag={w} {g}" for g in ("ddpm_weak", "cfg", "checkpoints/weak_copy") for w in weights] + ["cfg g=2"]
    # the cards: ddpm at the app's autoguidance, with its unguided numbers beside; the weak model alone
    assert results["recorded_quality"]["ddpm"] == f"ddpm ag={W:g} ddpm_weak" and results["recorded_quality"]["ddpm_weak"] == "ddpm ag=0 ddpm_weak"
    q = load_model(ckpt / "ddpm.safetensors").config["quality"]
    assert f"autoguidance {W:g} (ddpm_weak)" in q["measured on"]
    assert q["without autoguidance"]["distance / floor"] == round(rows["ddpm"]["metrics"]["frechet_ratio"], 2)
    assert "second classifier" in q and "accuracy" not in q["second classifier"]  # unconditional: no requested digit
    assert load_model(ckpt / "ddpm_weak.safetensors").config["quality"]["Frechet distance"] == round(rows["ddpm ag=0 ddpm_weak"]["metrics"]["frechet"], 3)
    weak = load_model(ckpt / "ddpm_weak.safetensors")
    own = sampling.replay_batches(rows["ddpm"]["batches"], weak)  # the guide sampled alone, from the same seeds
    assert sampling.images_sha256(own) == rows["ddpm ag=0 ddpm_weak"]["images_sha256"] == rows["ddpm ag=0 checkpoints/weak_copy"]["images_sha256"]
    assert rows["ddpm ag=2.5 ddpm_weak"]["images_sha256"] == rows["ddpm ag=2.5 checkpoints/weak_copy"]["images_sha256"]
    assert rows["ddpm ag=2.5 cfg"]["images_sha256"] != rows["ddpm ag=2.5 ddpm_weak"]["images_sha256"]
    ddpm = load_model(ckpt / "ddpm.safetensors")
    r = rows["ddpm ag=2.5 cfg"]
    assert sampling.images_sha256(sampling.replay_batches(r["batches"], ddpm, guide=load_model(ckpt / "cfg.safetensors"))) == r["images_sha256"]
    assert results["reference"]["classifier2_test_accuracy"] is not None
    for r in results["rows"]:
        m2 = r["metrics"]["second_classifier"]
        assert math.isfinite(m2["frechet_ratio"]) and 0 <= m2["confident"] <= 1
        assert (m2["accuracy"] is not None) == (r["group"] == "cfg")
    assert "| FD/floor (2) | accuracy (2) |" in report.results_markdown(results)
    with pytest.raises(SystemExit, match="a guide is one of"):
        cli.main(["--checkpoint-dir", str(ckpt), "--models", "ddpm", "--autoguidance", "2", "--guides", "mcl", "--quick", "--out-dir", str(tmp_path)])
