"""Checkpoints: safetensors round trip, refusal of pickles, truncated/corrupted/mismatched files,
and the resolution order (explicit path, checkpoint folder, Hugging Face Hub; never the network)."""
from __future__ import annotations

import shutil

import pytest
import torch

from diffusion_core import checkpoints
from diffusion_core.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from diffusion_core.models import load_model, save_model
from diffusion_core.nets import UNet, UNetConfig

TINY = dict(base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention=False)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """No test here may reach the network: no Hub repo unless a test sets one, and Hub offline."""
    monkeypatch.delenv(checkpoints.HF_REPO_ENV, raising=False)
    monkeypatch.delenv(checkpoints.DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def small_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g).double(),
        "steps": torch.arange(5),
        "cl": torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last),  # not contiguous
    }


def unet_config(net):
    return {"network": {"kind": "unet", "config": net.config.to_dict()}, "objective": {"name": "ddpm_eps", "schedule": {}}, "training": {"steps": 3}}


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_tensors_and_config(tmp_path):
    tensors = small_tensors()
    config = {"model": "ddpm", "nested": {"list": [1, 2.5, "x"], "none": None}, "unicode": "σ≥0"}
    path = save_checkpoint(tmp_path / "a.safetensors", tensors, config)
    loaded, cfg = load_checkpoint(path)
    assert cfg == config
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        expected = t.float() if t.is_floating_point() else t
        assert loaded[name].dtype == expected.dtype
        assert torch.equal(loaded[name], expected), name
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file of the atomic write was left behind"


def test_round_trip_fp16(tmp_path):
    tensors = small_tensors()
    full = save_checkpoint(tmp_path / "full.safetensors", tensors, {})
    half = save_checkpoint(tmp_path / "half.safetensors", tensors, {}, half=True)
    assert half.stat().st_size < full.stat().st_size
    loaded, _ = load_checkpoint(half)
    for name, t in tensors.items():
        if t.is_floating_point():
            assert loaded[name].dtype == torch.float32  # handed back as float32
            assert torch.equal(loaded[name], t.half().float()), name
            assert not torch.equal(loaded[name], t.float()), "fp16 option had no effect"
        else:
            assert torch.equal(loaded[name], t)  # integers untouched


def test_model_round_trip_gives_identical_outputs(tmp_path):
    net = tiny_unet(num_classes=10)
    path = save_model(tmp_path / "cfg.safetensors", "cfg", [net], unet_config(net))
    model = load_model(path)
    assert model.kind == "cfg" and model.num_classes == 10 and model.path == str(path)
    assert model.config["training"] == {"steps": 3}
    for (k, a), (k2, b) in zip(net.state_dict().items(), model.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10.0, 500.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), model.net(x, t, y))


def test_header_length_starting_with_pickle_byte_still_loads(tmp_path):
    """A valid file whose header length has 0x80 as low byte starts like a pickle; it must load."""
    for i in range(300):
        path = save_checkpoint(tmp_path / "x.safetensors", {"a": torch.ones(3)}, {"pad": "x" * i})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    tensors, config = load_checkpoint(path)
    assert config == {"pad": "x" * i} and torch.equal(tensors["a"], torch.ones(3))


# --- refused and broken files ----------------------------------------------------------------


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_is_refused_without_unpickling(tmp_path, monkeypatch, zipfile):
    path = tmp_path / "model.pt"
    torch.save(tiny_unet().state_dict(), path, _use_new_zipfile_serialization=zipfile)

    def no_unpickling(*a, **k):
        raise AssertionError("load_checkpoint must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)


@pytest.fixture
def saved(tmp_path):
    net = tiny_unet()
    path = save_model(tmp_path / "ddpm.safetensors", "ddpm", [net], unet_config(net))
    return path, path.read_bytes()


@pytest.mark.parametrize("keep", [0, 4, 8, 20, "header", "half", "minus1"])
def test_truncated_file(saved, keep):
    path, data = saved
    header_end = 8 + int.from_bytes(data[:8], "little")
    n = {"header": header_end - 10, "half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg, msg


@pytest.mark.parametrize("where", [-1, -5, -1000, 0.5])
def test_corrupted_tensor_bytes(saved, where):
    path, data = saved
    header_end = 8 + int.from_bytes(data[:8], "little")
    i = int(header_end + (len(data) - header_end) * where) if isinstance(where, float) else len(data) + where
    assert i >= header_end
    b = bytearray(data)
    b[i] ^= 0x01  # one bit
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "corrupted" in str(e.value) and "SHA-256" in str(e.value)


def test_corrupted_header_json(saved):
    path, data = saved
    b = bytearray(data)
    b[8] = ord("[")  # the opening brace of the header
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="header is not valid JSON") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_corrupted_config_metadata(saved):
    path, data = saved
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[8:header_end]
    i = 8 + header.index(b"base_channels") + 2  # a letter inside the stored config
    b = bytearray(data)
    b[i] ^= 0x01
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="config metadata does not match") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_no_header_bit_flip_goes_unnoticed(tmp_path):
    """Every single-bit flip in the length field or header either raises CheckpointError or leaves
    exactly the saved tensors and config (a flip in a key the loader does not need)."""
    tensors = {"weight": torch.randn(3, 2), "bias": torch.arange(4)}
    config = {"model": "ddpm", "network": {"kind": "unet", "config": {"base_channels": 8}}}
    path = save_checkpoint(tmp_path / "small.safetensors", tensors, config)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i in range(header_end):
        b = bytearray(data)
        b[i] ^= 0x01 if i >= 8 else 0x20  # keeps ASCII text ASCII; moves the length by a lot
        path.write_bytes(bytes(b))
        try:
            got, cfg = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            continue
        assert cfg == config, f"flip at byte {i} changed the config silently"
        assert set(got) == set(tensors) and all(torch.equal(got[k], v.float() if v.is_floating_point() else v) for k, v in tensors.items()), f"flip at byte {i}"


def test_not_a_diffusion_core_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a diffusion_core checkpoint"):
        load_checkpoint(path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="file not found") as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


def _resave_with(path, edit):
    tensors, config = load_checkpoint(path)
    tensors, config = edit(tensors, config)
    save_checkpoint(path, tensors, config)  # valid digests: only the mismatch is wrong


def test_config_width_mismatch(saved):
    path, _ = saved

    def wider(tensors, config):
        config["network"]["config"]["base_channels"] = 16
        return tensors, config

    _resave_with(path, wider)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg and "do not match the config" in msg and "size mismatch" in msg, msg


def test_missing_and_extra_tensors(saved):
    path, data = saved
    _resave_with(path, lambda t, c: ({k: v for k, v in t.items() if k != "net.stem.weight"}, c))
    with pytest.raises(CheckpointError, match="do not match the config.*net.stem.weight|stem.weight") as e:
        load_model(path)
    assert str(path) in str(e.value)
    path.write_bytes(data)
    _resave_with(path, lambda t, c: ({**t, "stray.tensor": torch.zeros(1)}, c))
    with pytest.raises(CheckpointError, match="holds .* tensors, its config describes"):
        load_model(path)


def test_config_without_network(saved):
    path, _ = saved
    _resave_with(path, lambda t, c: (t, {"model": "ddpm"}))
    with pytest.raises(CheckpointError, match="config lacks model/network"):
        load_model(path)


# --- resolution ------------------------------------------------------------------------------


@pytest.fixture
def two_dirs(tmp_path, tiny_checkpoints):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(tiny_checkpoints / "cfg.safetensors", a / "cfg.safetensors")
    shutil.copy(tiny_checkpoints / "ddpm.safetensors", b / "cfg.safetensors")  # a different file, same name
    return a, b


def test_explicit_path_comes_first(two_dirs, monkeypatch, tmp_path):
    a, b = two_dirs
    monkeypatch.setenv(checkpoints.DIR_ENV, str(b))
    assert resolve_checkpoint(a / "cfg.safetensors") == a / "cfg.safetensors"
    assert load_model(str(a / "cfg.safetensors")).kind == "cfg"
    monkeypatch.chdir(a)  # a bare file name that exists is a path, too
    assert resolve_checkpoint("cfg.safetensors") == a.joinpath("cfg.safetensors").relative_to(a)


def test_name_resolves_in_env_dir_then_argument(two_dirs, monkeypatch):
    a, b = two_dirs
    monkeypatch.setenv(checkpoints.DIR_ENV, str(b))
    assert resolve_checkpoint("cfg") == b / "cfg.safetensors"
    assert load_model("cfg").kind == "ddpm"  # the file in b
    assert resolve_checkpoint("cfg", directory=a) == a / "cfg.safetensors"  # explicit folder beats the env
    assert load_model("cfg", directory=a).kind == "cfg"
    assert resolve_checkpoint("cfg.safetensors") == b / "cfg.safetensors"


def test_default_dir_is_project_checkpoints(monkeypatch):
    assert checkpoints.checkpoint_dir() == checkpoints.PROJECT_ROOT / "checkpoints"
    monkeypatch.setenv(checkpoints.DIR_ENV, "/somewhere")
    assert str(checkpoints.checkpoint_dir()) == "/somewhere"


def test_local_file_wins_over_hub(two_dirs, monkeypatch):
    import huggingface_hub

    a, _ = two_dirs
    monkeypatch.setenv(checkpoints.DIR_ENV, str(a))
    monkeypatch.setenv(checkpoints.HF_REPO_ENV, "someone/mnist-diffusion")

    def fail(**kw):
        raise AssertionError("the Hub must not be asked when the file is local")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    assert resolve_checkpoint("cfg") == a / "cfg.safetensors"


def test_hub_is_used_when_local_is_missing(tmp_path, tiny_checkpoints, monkeypatch):
    import huggingface_hub

    empty, cache = tmp_path / "empty", tmp_path / "hub_cache"
    empty.mkdir()
    cache.mkdir()
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        dst = cache / filename
        shutil.copy(tiny_checkpoints / filename, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv(checkpoints.DIR_ENV, str(empty))
    monkeypatch.setenv(checkpoints.HF_REPO_ENV, "someone/mnist-diffusion")
    model = load_model("mcl")
    assert calls == [("someone/mnist-diffusion", "mcl.safetensors")]
    assert model.kind == "mcl" and model.num_experts == 3 and model.path == str(cache / "mcl.safetensors")


def test_missing_name_lists_where_it_looked(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv(checkpoints.DIR_ENV, str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("ddpm")
    msg = str(e.value)
    assert "not found" in msg and str(tmp_path / "ddpm.safetensors") in msg and checkpoints.HF_REPO_ENV in msg

    def offline(repo_id, filename, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv(checkpoints.HF_REPO_ENV, "someone/mnist-diffusion")
    with pytest.raises(CheckpointError) as e:
        load_model("ddpm")
    msg = str(e.value)
    assert str(tmp_path / "ddpm.safetensors") in msg and "hf://someone/mnist-diffusion/ddpm.safetensors (OSError)" in msg


def test_read_config_without_loading(saved):
    path, _ = saved
    cfg = checkpoints.read_config(path)
    assert cfg["model"] == "ddpm" and cfg["network"]["config"]["base_channels"] == 8
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        checkpoints.read_config(path)
    assert str(path) in str(e.value)


def test_update_config_keeps_tensors_as_stored(tmp_path):
    """Recording measured quality rewrites the config only: fp16 tensors stay fp16, bit for bit."""
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "h.safetensors", small_tensors(), {"model": "ddpm", "training": {"epochs": 1}}, half=True)
    before = load_checkpoint(path)[0]
    size = path.stat().st_size
    checkpoints.update_config(path, {"quality": {"frechet": 1.5}})
    tensors, config = load_checkpoint(path)
    assert config == {"model": "ddpm", "training": {"epochs": 1}, "quality": {"frechet": 1.5}}
    assert all(torch.equal(tensors[k], before[k]) for k in before)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("w").dtype == torch.float16
    assert abs(path.stat().st_size - size) < 200  # not widened to fp32


def test_update_config_refuses_a_corrupted_file(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoints.update_config(path, {"quality": {}})
    assert path.read_bytes() == bytes(data)  # left as it was
