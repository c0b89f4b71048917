"""Checkpoints: one safetensors file per model, its full config in the safetensors metadata.

Loading never unpickles. Tensor bytes and the config are covered by SHA-256 digests in the
metadata, so a truncated or corrupted file, a pickle, or a file whose tensors do not fit its config
gives a ``CheckpointError`` that names the file and what is wrong. (Files written before the config
digest existed, without ``config_sha256``, still load; only their tensors are verified.)

Resolution order for a model name such as ``cfg``: an explicit existing path, then
``checkpoints/<name>.safetensors`` (or ``$DIFFUSION_CHECKPOINT_DIR``), then a Hugging Face Hub repo
when ``$DIFFUSION_HF_REPO`` is set (through huggingface_hub; offline, local files alone work).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "diffusion_core/1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = PROJECT_ROOT / "checkpoints"
HF_REPO_ENV = "DIFFUSION_HF_REPO"
DIR_ENV = "DIFFUSION_CHECKPOINT_DIR"


class CheckpointError(ValueError):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path, tensors: dict[str, torch.Tensor], config: dict, half: bool = False) -> Path:
    """Write tensors and their config atomically (temp file, then rename). ``half`` stores floats as fp16."""
    path = Path(path)
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if half and t.is_floating_point():
            t = t.half()
        out[name] = t
    config_json = json.dumps(config, sort_keys=True)
    meta = {"format": FORMAT, "config": config_json, "sha256": _digest(out), "config_sha256": _text_digest(config_json)}
    data = st_save(out, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; returns (tensors as float32 where floating, config)."""
    tensors, config = _read_verified(path)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, config


def update_config(path, changes: dict) -> Path:
    """Rewrite a checkpoint's config with ``changes`` merged in at the top level (e.g. the
    ``quality`` that ``python -m diffusion_core.evaluate --record-quality`` measured). The file is
    verified first; its tensors are written back as stored (same dtypes, same digest)."""
    tensors, config = _read_verified(path)
    return save_checkpoint(path, tensors, dict(config, **changes))


def _read_verified(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors as stored and the config of a checkpoint, after every check ``load_checkpoint`` names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    data = path.read_bytes()
    # A torch.save file is a zip ("PK") or a legacy pickle (protocol byte 0x80). The pickle check
    # only applies when the bytes are not a readable safetensors header: a valid safetensors file
    # whose header length has 0x80 as its low byte also starts with 0x80.
    pickle_error = CheckpointError(path, "looks like a pickled PyTorch file (torch.save); only safetensors checkpoints are accepted (loading never unpickles)")
    looks_pickled = data[:2] == b"PK" or data[:1] == b"\x80"
    if len(data) < 8:
        raise CheckpointError(path, f"truncated ({len(data)} bytes; not a safetensors file)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        if looks_pickled:
            raise pickle_error
        raise CheckpointError(path, f"truncated: header says {header_len} bytes, file has {len(data) - 8} after the length field")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        if looks_pickled:
            raise pickle_error from None
        raise CheckpointError(path, "corrupted: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupted: the safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(path, "corrupted: the safetensors metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"not a diffusion_core checkpoint (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise CheckpointError(path, f"truncated or corrupted safetensors data ({e})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise CheckpointError(path, "corrupted: tensor data does not match the SHA-256 recorded in its metadata")
    if "config_sha256" in meta and _text_digest(meta.get("config", "")) != meta["config_sha256"]:
        raise CheckpointError(path, "corrupted: config metadata does not match the SHA-256 recorded in its metadata")
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(path, "corrupted: config metadata missing or not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "corrupted: config metadata is not a JSON object")
    return tensors, config


def read_config(path) -> dict:
    """The config of a checkpoint without verifying its tensors (for model cards)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"])
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(path, f"cannot read metadata ({e})") from None


def checkpoint_dir(directory=None) -> Path:
    """``directory`` when given, else ``$DIFFUSION_CHECKPOINT_DIR``, else ``checkpoints/``."""
    return Path(directory or os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def resolve_checkpoint(name_or_path, directory=None) -> Path:
    """Explicit path, then ``<dir>/<name>.safetensors`` (``dir`` from ``checkpoint_dir(directory)``),
    then the configured Hub repo."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_file():
        return p
    name = str(name_or_path)
    local = checkpoint_dir(directory) / (name if name.endswith(".safetensors") else f"{name}.safetensors")
    if local.is_file():
        return local
    looked = [str(p), str(local)]
    repo = os.environ.get(HF_REPO_ENV)
    if repo:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=repo, filename=local.name))
        except Exception as e:  # noqa: BLE001 - offline, missing repo or file
            looked.append(f"hf://{repo}/{local.name} ({type(e).__name__})")
    raise CheckpointError(name, "not found; looked in " + ", ".join(looked) + (f" (set {HF_REPO_ENV}=owner/repo to fetch from the Hugging Face Hub)" if not repo else ""))
