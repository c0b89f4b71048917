"""Settings validation, labels, every sampler on every model kind, and the model registry."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch

from diffusion_core import registry as registry_module
from diffusion_core.checkpoints import CheckpointError
from diffusion_core.pipeline import MAX_SEED, Settings, generate, labels_for, trajectory
from diffusion_core.registry import ModelRegistry
from diffusion_core.samplers import SAMPLERS

ROUTINGS = ["expert:0", "expert:2", "heuristic", "gated", "soft", "pooled"]


# --- Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"steps": 10**6}, "steps must be between 1 and 1000"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"steps": "many"}, "steps must be an integer"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": float("inf")}, "guidance must be a finite number"),
        ({"guidance": -1}, "guidance must be between 0 and 20"),
        ({"guidance": 1e9}, "guidance must be between 0 and 20"),
        ({"guidance": "strong"}, "guidance must be a number"),
        ({"digit": 11}, "digit must be between 0 and 9, got 11"),
        ({"digit": -1}, "digit must be between 0 and 9"),
        ({"digit": True}, "digit must be an integer"),
        ({"sampler": "plms"}, "unknown sampler 'plms'; expected one of ddpm, ddpm_nonoise, ddim, euler, heun, dpmpp_2m"),
        ({"sampler": ["euler"]}, "unknown sampler"),
        ({"routing": "random"}, "unknown routing 'random'"),
        ({"routing": "expert:two"}, "expert:K with K an integer"),
        ({"seed": MAX_SEED + 1}, "seed must be between 0 and 2^63-1"),
        ({"seed": -1}, "seed must be between 0 and 2^63-1"),
        ({"n": 10001}, "number of images must be between 1 and 10000"),
        ({"n": 0}, "number of images must be between 1"),
        ({"eta": 1.5}, "eta must be between 0 and 1"),
        ({"model": ""}, "model must be a name"),
        ({"model": 3}, "model must be a name"),
    ],
)
def test_bad_settings_give_clear_value_errors(change, message):
    with pytest.raises(ValueError) as e:
        Settings(**change).validate()
    assert message in str(e.value)


def test_too_many_images_for_a_caller_limit_and_expert_range():
    with pytest.raises(ValueError, match="between 1 and 64, got 65"):
        Settings(n=65).validate(max_n=64)
    with pytest.raises(ValueError, match=r"expert index must be in 0..2"):
        Settings(routing="expert:3").validate(num_experts=3)
    Settings(routing="expert:3").validate()  # K unknown yet: only the spelling is checked


def test_valid_settings_are_normalised():
    s = Settings(steps="12", seed=MAX_SEED, n=3.0, digit="", guidance="1.5", routing=" Pooled ", eta="0.5").validate()
    assert (s.steps, s.seed, s.n, s.digit, s.guidance, s.routing, s.eta) == (12, MAX_SEED, 3, None, 1.5, "pooled", 0.5)
    assert Settings(digit="7").validate().digit == 7


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"steps": 4, "colour": "red"}', "unknown settings ['colour']"),
        ('{"steps": 4,', "settings are not valid JSON"),
        ("", "settings are not valid JSON"),
        ("[1, 2]", "settings must be a JSON object"),
        ("null", "settings must be a JSON object"),
    ],
)
def test_bad_settings_json(text, message):
    with pytest.raises(ValueError) as e:
        Settings.from_json(text)
    assert message in str(e.value)


def test_settings_json_round_trip():
    s = Settings(model="mcl", sampler="heun", steps=7, seed=2**40, n=5, digit=3, guidance=4.0, routing="soft", eta=0.25)
    back = Settings.from_json(s.to_json())
    assert back == s
    assert json.loads(s.to_json())["seed"] == 2**40
    assert Settings.from_json('{"steps": 3}') == Settings(steps=3)  # missing keys take the defaults


def test_labels_cycle_through_digits_when_omitted():
    assert labels_for(Settings(n=23).validate(), True).tolist() == [i % 10 for i in range(23)]
    assert labels_for(Settings(n=4, digit=7).validate(), True).tolist() == [7, 7, 7, 7]
    assert labels_for(Settings(n=4, digit=7).validate(), False) is None


# --- every sampler on every model kind ---------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    reg = ModelRegistry(tiny_checkpoints)
    return {name: reg.get(name) for name in ("ddpm", "cfg", "mcl")}, reg.get("gating").net


CASES = [("ddpm", None), ("cfg", None)] + [("mcl", r) for r in ROUTINGS]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("kind,routing", CASES, ids=[f"{k}-{r}" if r else k for k, r in CASES])
def test_every_sampler_on_every_model(models, sampler, kind, routing):
    loaded, gate = models
    model = loaded[kind]
    steps, n = 3, 2
    settings = Settings(model=kind, sampler=sampler, steps=steps, seed=5, n=n, guidance=2.0, routing=routing or "gated", eta=0.5)
    records = list(trajectory(settings, model, gate))
    assert [r.index for r in records] == list(range(steps))
    sig = [r.sigma for r in records] + [records[-1].sigma_next]
    assert all(a > b for a, b in zip(sig, sig[1:])) and sig[-1] == 0
    for r in records:
        assert r.x.shape == r.denoised.shape == (n, 1, 28, 28)
        assert torch.isfinite(r.x).all()
        if kind == "mcl":
            assert r.expert is not None and r.expert.shape == (n,)
            assert 0 <= int(r.expert.min()) and int(r.expert.max()) < model.num_experts
            if routing.startswith("expert:"):
                assert r.expert.tolist() == [int(routing[7:])] * n
            if routing in ("gated", "soft"):
                assert r.gate_probs.shape == (n, model.num_experts)
        else:
            assert r.expert is None
    if kind == "mcl" and routing == "pooled":
        assert all(torch.equal(records[0].expert, r.expert) for r in records)
    result = generate(settings, model, gate)
    assert result.images.dtype == torch.uint8 and result.images.shape == (n, 28, 28)
    assert torch.equal(result.images, ((records[-1].x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0])
    assert (result.labels is not None) == (kind == "cfg")
    if kind == "mcl":
        assert result.experts.shape == (steps, n)
    else:
        assert result.experts is None


def test_generate_is_deterministic_and_seed_dependent(models):
    loaded, _ = models
    s = dict(model="cfg", sampler="ddpm", steps=4, n=3)
    a = generate(Settings(seed=1, **s), loaded["cfg"])
    b = generate(Settings(seed=1, **s), loaded["cfg"])
    c = generate(Settings(seed=2, **s), loaded["cfg"])
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert a.labels.tolist() == [0, 1, 2]


def test_cfg_labels_and_digit(models):
    loaded, _ = models
    r = generate(Settings(model="cfg", steps=2, n=12, digit=None), loaded["cfg"])
    assert r.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    r = generate(Settings(model="cfg", steps=2, n=3, digit=4), loaded["cfg"])
    assert r.labels.tolist() == [4, 4, 4]


def test_gated_routing_without_gate_is_a_clear_error(models):
    loaded, _ = models
    for routing in ("gated", "soft"):
        with pytest.raises(ValueError, match="needs the gating checkpoint"):
            generate(Settings(model="mcl", steps=2, routing=routing), loaded["mcl"], gate=None)
    with pytest.raises(ValueError, match="expert index must be in 0..2"):
        generate(Settings(model="mcl", steps=2, routing="expert:3"), loaded["mcl"])


# --- the model registry ----------------------------------------------------------------------


@pytest.fixture
def ckdir(tmp_path, tiny_checkpoints):
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, d)
    return d


def counting_loads(monkeypatch, delay=0.0):
    calls = []
    real = registry_module.load_model

    def load(path, device="cpu"):
        calls.append(str(path))
        time.sleep(delay)
        return real(path, device=device)

    monkeypatch.setattr(registry_module, "load_model", load)
    return calls


def test_registry_lists_available_models(ckdir):
    reg = ModelRegistry(ckdir)
    assert set(reg.available()) == {"ddpm", "ddpm_weak", "cfg", "mcl", "mcl_shared", "gating", "classifier"}
    assert reg.available_diffusion_models() == ["ddpm", "cfg", "mcl", "mcl_shared"]  # the guide is no menu model
    assert reg.available_diffusion_models() == ["ddpm", "cfg", "mcl", "mcl_shared"]
    (ckdir / "ddpm.safetensors").unlink()
    (ckdir / "gating.safetensors").unlink()
    assert reg.available_diffusion_models() == ["cfg", "mcl", "mcl_shared"]
    assert "gating" not in reg.available()


def test_registry_uses_env_dir_by_default(ckdir, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CHECKPOINT_DIR", str(ckdir))
    reg = ModelRegistry()
    assert reg.directory == ckdir
    assert reg.get("cfg").path == str(ckdir / "cfg.safetensors")


def test_registry_caches_and_reloads_changed_files(ckdir, monkeypatch):
    calls = counting_loads(monkeypatch)
    reg = ModelRegistry(ckdir)
    a = reg.get("cfg")
    assert reg.get("cfg") is a and len(calls) == 1
    shutil.copy(ckdir / "ddpm.safetensors", ckdir / "cfg.safetensors")  # a training run wrote a new file
    st = os.stat(ckdir / "cfg.safetensors")
    os.utime(ckdir / "cfg.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = reg.get("cfg")
    assert b is not a and b.kind == "ddpm" and len(calls) == 2
    (ckdir / "cfg.safetensors").unlink()
    assert reg.get("cfg") is b  # a vanished file: keep serving what was loaded
    reg.clear()
    with pytest.raises(CheckpointError, match="not found"):
        reg.get("cfg")


def test_registry_loads_once_under_concurrency(ckdir, monkeypatch):
    calls = counting_loads(monkeypatch, delay=0.2)
    reg = ModelRegistry(ckdir)
    got, errors = [], []

    def worker(name):
        try:
            got.append((name, reg.get(name)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ["cfg"] * 4 + ["ddpm"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.path.basename(c) for c in calls) == ["cfg.safetensors", "ddpm.safetensors"]
    assert len({id(m) for n, m in got if n == "cfg"}) == 1


def test_registry_for_settings_loads_gate_only_when_needed(ckdir, monkeypatch):
    calls = counting_loads(monkeypatch)
    reg = ModelRegistry(ckdir)
    for routing in ("heuristic", "pooled", "expert:1"):
        model, gate = reg.for_settings(Settings(model="mcl", routing=routing))
        assert model.kind == "mcl" and gate is None
    assert [os.path.basename(c) for c in calls] == ["mcl.safetensors"]
    for routing in ("gated", "soft"):
        model, gate = reg.for_settings(Settings(model="mcl", routing=routing))
        assert isinstance(gate, torch.nn.Module) and gate is reg.get("gating").net
    model, gate = reg.for_settings(Settings(model="cfg", routing="gated"))
    assert model.kind == "cfg" and gate is None


def test_watch_gate_loads_the_gate_when_present_and_keeps_the_images(ckdir):
    reg = ModelRegistry(ckdir)
    settings = Settings(model="mcl", routing="pooled", steps=3, n=2, seed=4)
    model, gate = reg.for_settings(settings, watch_gate=True)
    assert gate is reg.get("gating").net
    plain = list(trajectory(settings, model, None))
    watched = list(trajectory(settings, model, gate, watch_gate=True))
    assert all(a.gate_probs is None for a in plain)
    for a, b in zip(plain, watched):
        assert torch.equal(a.x, b.x) and torch.equal(a.expert, b.expert)
        assert b.gate_probs.shape == (2, model.num_experts) and torch.allclose(b.gate_probs.sum(dim=1), torch.ones(2))
    (ckdir / "gating.safetensors").unlink()
    assert ModelRegistry(ckdir).for_settings(settings, watch_gate=True)[1] is None  # nothing to show, nothing needed


def test_registry_missing_gate_says_which_routing_needs_it(ckdir):
    (ckdir / "gating.safetensors").unlink()
    reg = ModelRegistry(ckdir)
    assert reg.for_settings(Settings(model="mcl", routing="pooled"))[1] is None
    with pytest.raises(CheckpointError) as e:
        reg.for_settings(Settings(model="mcl", routing="gated"))
    assert "not found" in str(e.value) and "routing 'gated' needs the gating network" in str(e.value)


def test_registry_gate_beside_a_model_path_and_k_mismatch(ckdir, tmp_path, tiny_checkpoints):
    from conftest import make_tiny_checkpoints

    other = make_tiny_checkpoints(tmp_path / "k2", num_experts=2)
    reg = ModelRegistry(ckdir)  # its own gating has K=3
    model, gate = reg.for_settings(Settings(model=str(other / "mcl.safetensors"), routing="soft"))
    assert model.num_experts == 2 and gate.config.num_experts == 2  # the sibling gating file
    (other / "gating.safetensors").unlink()
    with pytest.raises(ValueError, match="routes to 3 experts but the MCL ensemble .* has 2"):
        ModelRegistry(ckdir).for_settings(Settings(model=str(other / "mcl.safetensors"), routing="gated"))


def test_registry_refuses_non_diffusion_models(ckdir):
    with pytest.raises(ValueError, match="is a classifier checkpoint, not a diffusion model"):
        ModelRegistry(ckdir).for_settings(Settings(model="classifier"))
