"""Sample images from the command line, with the app's defaults.

    python -m diffusion_core.sample --model cfg --digit 7 --n 16 --out sevens.npz --grid sevens.png
    python -m diffusion_core.sample --model mcl --routing pooled --sampler heun --steps 20 --out m.npz
    python -m diffusion_core.sample --settings shared.json --out replay.npz      # replay a saved setting
    python -m diffusion_core.sample --settings replay.npz --seed 5 --out other.npz  # ...with one change
    python -m diffusion_core.sample --settings compare.json --grid grid.png     # the app's Compare grid, same PNG
    python -m diffusion_core.sample --settings sdedit.json --grid sdedit.png    # an Explore SDEdit result, same PNG
    python -m diffusion_core.sample --list-models                               # the models whose checkpoints exist

The ``.npz`` holds ``images`` (N, 28, 28) uint8, ``labels`` (N,) for class-conditional models,
``experts`` (steps, N) for MCL ensembles (the expert that served each image at each step) and
``settings``: the JSON of the settings used, which ``--settings`` replays to the identical images
(on the same kind of device; on an x86 CPU the command uses the app's numerics,
``diffusion_core.reproducible``). Flags given alongside ``--settings`` override it. A comparison's or an
SDEdit result's settings JSON from the app (``"kind": "compare"`` / ``"sdedit"``) replays to the
app's own PNG (``--grid``, byte for byte) and an ``.npz`` (``--out``) with its images and settings.
Bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from . import reproducible
from .checkpoints import DIR_ENV, CheckpointError
from .guidance import AUTOGUIDE_OF
from .pipeline import APP_AUTOGUIDANCE, APP_AUTOGUIDANCE_OF_MODEL, APP_GUIDANCE, DEFAULT_GUIDES, MAX_AUTOGUIDANCE, Settings, app_defaults, generate
from .samplers import SAMPLERS

PROG = "python -m diffusion_core.sample"
# flag -> Settings field, for the flags that are settings
SETTING_FLAGS = ("model", "sampler", "steps", "seed", "n", "digit", "guidance", "routing", "eta", "autoguidance", "guide", "autoguide")


class UsageError(Exception):
    """Bad input found after parsing: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = _Parser(
        prog=PROG,
        description="Sample MNIST digits from a ddpm, cfg or mcl checkpoint. Defaults are the app's.",
        # Setting flags default to None so that only the ones given override --settings.
        argument_default=None,
    )
    p.add_argument("--model", metavar="{ddpm,cfg,flow,mcl,...,PATH}",
                   help=f"model name (any checkpoint in the checkpoint folder; --list-models) or checkpoint path (default {d.model})")
    p.add_argument("--sampler", choices=list(SAMPLERS), help=f"(default {d.sampler})")
    p.add_argument("--steps", type=int, metavar="N", help=f"sampling steps (default {d.steps})")
    p.add_argument("--seed", type=int, metavar="S", help=f"random seed, 0..2^63-1 (default {d.seed})")
    p.add_argument("--n", type=int, metavar="N", help=f"number of images (default {d.n})")
    p.add_argument("--digit", type=int, metavar="D", help="digit 0-9 for cfg (default: cycle 0-9)")
    p.add_argument("--guidance", type=float, metavar="G", help="cfg/flow guidance scale: 0 unconditional, 1 conditional, >1 guided (default: the app's, "
                   + ", ".join(f"{k} {g:g}" for k, g in APP_GUIDANCE.items()) + ")")
    p.add_argument("--routing", metavar="{pooled,winrate,guided[:W],sampled,soft,gated,heuristic,x0gate,scout,sticky[:SIGMA],expert:K}", help=f"mcl routing (default {d.routing})")
    p.add_argument("--eta", type=float, metavar="E", help=f"ddim stochasticity 0..1 (default {d.eta:g})")
    p.add_argument("--autoguidance", type=float, metavar="W",
                   help=f"guidance without labels for ddpm and mcl: D_bad + W (D - D_bad), 0..{MAX_AUTOGUIDANCE:g}; 1 is the model alone "
                        f"(default: the app's, {', '.join(f'{k} {w:g}' for k, w in APP_AUTOGUIDANCE.items())}, "
                        f"{', '.join(f'{k} {w:g} of the {of}' for k, (w, of) in APP_AUTOGUIDANCE_OF_MODEL.items())}; a --settings file's own value)")
    p.add_argument("--guide", metavar="NAME|PATH",
                   help="the bad model of --autoguidance: a ddpm, cfg or flow checkpoint (a class-conditional one guides with its "
                        f"unconditional branch; default {DEFAULT_GUIDES['ddpm']})")
    p.add_argument("--autoguide", choices=AUTOGUIDE_OF,
                   help="what --autoguidance compares the guide with: the output, or an MCL on one trunk's experts' mixture, "
                        "D_k + (W - 1) (D_mix - D_bad) (default output; with neither flag, the app's for the model)")
    p.add_argument("--out", metavar="FILE.npz", help="where to write the images (this, --grid or both)")
    p.add_argument("--grid", metavar="FILE.png", help="write the images as a PNG grid (for compare/sdedit settings: the app's PNG)")
    p.add_argument("--list-models", action="store_true", help="list the models whose checkpoints exist, and exit")
    p.add_argument("--settings", metavar="FILE.json", help="start from saved settings (a JSON file, or an .npz written by this command)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default cpu; images are bit-identical across runs on CPU)")
    p.add_argument("--threads", type=int, metavar="T", default=reproducible.THREADS,
                   help=f"torch CPU threads (default {reproducible.THREADS}, the app's: its share links' bytes are defined at this count)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help=f"where model names are looked up (default ${DIR_ENV} or checkpoints/)")
    return p


def read_settings_file(path: str) -> Settings:
    """Settings from a JSON file, or from the ``settings`` entry of an ``.npz`` this command wrote."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--settings {path}: file not found")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "settings" not in z:
                    raise UsageError(f"--settings {path}: the npz holds no 'settings' entry")
                text = str(z["settings"])
        except (OSError, ValueError) as e:
            raise UsageError(f"--settings {path}: cannot read the npz ({e})") from None
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--settings {path}: cannot read ({e})") from None
    try:
        return Settings.from_json(text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--settings {path}: {e}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The saved settings (or the defaults), with the flags that were given applied on top."""
    settings = read_settings_file(args.settings) if args.settings else Settings()
    for name in SETTING_FLAGS:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    return settings


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def save_npz(path: Path, result) -> None:
    arrays = {"images": result.images.numpy().astype(np.uint8), "settings": np.array(result.settings.to_json())}
    if result.labels is not None:
        arrays["labels"] = result.labels.numpy().astype(np.int64)
    if result.experts is not None:
        arrays["experts"] = result.experts.numpy().astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad) uint8 image, row-major."""
    n, h, w = images.shape
    cols = columns or min(n, 10)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(path: Path, images: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images), mode="L").save(path, format="PNG")


def list_models(args: argparse.Namespace) -> None:
    from .registry import ModelRegistry
    from .ui.common import available_models, model_label

    registry = ModelRegistry(args.checkpoint_dir)
    models = available_models(registry)
    if not models:
        print(f"no diffusion model checkpoints in {registry.directory}")
    for name, info in models.items():
        print(f"{name:<12} {model_label(info)}; {info.kind} checkpoint, objective {info.objective}, {info.path}")


def _settings_kind(path: str | None) -> tuple[str, dict | None]:
    """("compare" | "sdedit", the JSON object) for the app's comparison / SDEdit settings files, else ("sample", None)."""
    if not path or Path(path).suffix == ".npz":
        return "sample", None
    p = Path(path).expanduser()
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "sample", None  # read_settings_file reports the problem
    if isinstance(d, dict) and d.get("kind") in ("compare", "sdedit"):
        return d["kind"], d
    return "sample", None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def run_app_settings(args: argparse.Namespace, kind: str, d: dict, out: Path | None, grid: Path | None) -> None:
    """Replay a comparison or an SDEdit result exactly as the app renders it."""
    import torch

    from .registry import ModelRegistry
    from .ui.common import available_models
    from .ui.compare_tab import compare, compare_from_dict, compare_json
    from .ui.explore_tab import edit_from_json, sdedit_image
    from .ui.render import png_bytes, split_grid

    if args.device != "cpu":
        raise UsageError(f"--device {args.device}: {kind} settings replay on the CPU, as the app runs them")
    if args.n is not None:
        raise UsageError(f"--n does not apply to {kind} settings (one image per row)")
    registry = ModelRegistry(args.checkpoint_dir)
    models = available_models(registry)
    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if name != "n" and getattr(args, name) is not None}
    with torch.inference_mode():
        if kind == "compare":
            d = dict(d, base=dict(d.get("base") or {}, **overrides)) if overrides else d
            base, axis, rows, columns = compare_from_dict(models, d)
            img, meta = compare(registry, rows, axis, columns=columns, base=base)
            text = compare_json(meta)
            arrays = {"grid": img, "settings": np.array(text)}
            what = f"a comparison of {len(rows)} {axis} values ({base.model}, seed {base.seed})"
        else:
            d = dict(d, **overrides)
            es = edit_from_json(models, json.dumps(d))
            img = sdedit_image(registry, es, models[es.model])
            text = es.to_json()
            arrays = {"images": split_grid(img, 1), "settings": np.array(text)}
            what = f"an SDEdit result ({es.model}, {es.sampler}, level {es.level:g}, seed {es.seed})"
    if out is not None:
        _save_npz(out, **arrays)
    if grid is not None:
        _atomic_write(grid, png_bytes(img))
    print(f"wrote {what} to " + " and ".join(str(p) for p in (out, grid) if p is not None))


def run(args: argparse.Namespace) -> Path | None:
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    reproducible.pin(args.threads)  # the app's numerics (AVX2 kernels unless something computed already, its threads)
    import torch

    from .registry import ModelRegistry

    if args.list_models:
        list_models(args)
        return None
    if not args.out and not args.grid:
        raise UsageError("give --out FILE.npz, --grid FILE.png or both")
    out = Path(args.out).expanduser() if args.out else None
    grid = Path(args.grid).expanduser() if args.grid else None
    for flag, p in (("--out", out), ("--grid", grid)):
        if p is not None and p.is_dir():
            raise UsageError(f"{flag} {p} is a directory; give a file name")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    kind, d = _settings_kind(args.settings)
    if kind != "sample":
        run_app_settings(args, kind, d, out, grid)
        return out
    settings = settings_from_args(args)
    settings.validate()
    registry = ModelRegistry(args.checkpoint_dir, device=args.device)
    model, gate = registry.for_settings(settings)
    if not args.settings:  # the app's defaults for this model, where no flag says otherwise
        app = app_defaults(model.kind, bool(model.num_classes), settings.model)
        settings.guidance = app.guidance if args.guidance is None else settings.guidance
        if args.autoguidance is None:
            settings.autoguidance = app.autoguidance
            settings.autoguide = app.autoguide if args.autoguide is None else settings.autoguide
    settings.validate(num_experts=model.num_experts if model.kind == "mcl" else None)
    guide = registry.guide_for(settings, model)
    ignored = {
        "digit": (not model.num_classes, f"the {model.kind} model is unconditional"),
        "guidance": (not model.num_classes, f"the {model.kind} model is unconditional"),
        "routing": (model.kind != "mcl", f"the {model.kind} model is not an MCL ensemble"),
        "eta": (settings.sampler != "ddim", f"only the ddim sampler uses it, not {settings.sampler}"),
    }
    for name, (is_ignored, why) in ignored.items():
        if getattr(args, name) is not None and is_ignored:
            print(f"note: --{name} has no effect: {why}", file=sys.stderr)
    with torch.inference_mode():
        result = generate(settings, model, gate, device=args.device, guide=guide)
    if out is not None:
        save_npz(out, result)
    if grid is not None:
        save_grid(grid, result.images.numpy())
    what = f"{len(result.images)} image(s) from {model.kind} ({model.path}), {settings.sampler} {settings.steps} steps, seed {settings.seed}"
    print(f"wrote {what} to " + " and ".join(str(p) for p in (out, grid) if p is not None))
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"{parser.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out/--grid, a full disk
        print(f"{parser.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
