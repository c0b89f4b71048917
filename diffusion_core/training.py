"""The one training loop behind the scripts in train/ (ddpm, ddpm_weak, cfg, flow, cold_blur, mcl, gating, classifier).

A ``Task`` (see ``diffusion_core.tasks``) says what differs between the scripts: which network,
which loss, what a sample grid shows and what gets exported. ``train(task, args)`` does the rest,
top to bottom:

1. setup: ``--quick`` defaults, argument checks, DistributedDataParallel under torchrun (rank 0
   logs and saves; ``DIFFUSION_DIST_BACKEND=gloo`` forces gloo on GPUs), the device;
2. data: the MNIST training set as one tensor on the device (no DataLoader, no per-sample
   transforms); each epoch is one seeded permutation, rank ``r`` of ``W`` takes every W-th batch;
3. model: the task's network (channels_last on CUDA; on the CPU it slows bf16 down), an EMA copy (the weights exported), AdamW with
   linear warmup and cosine decay, ``--compile``;
4. resume: ``<run-dir>/state.pt`` (``runlog.ResumeState``) holds everything needed to carry on
   bit for bit; it is written atomically every ``--save-every`` steps and at every epoch end, so
   a run killed with SIGKILL and rerun with ``--resume`` continues from its last save, on the
   same permutation at the same batch; ``runlog.Progress`` is where the run is;
5. the loop: bf16 autocast on CUDA, gradient clipping, EMA update, a metrics.jsonl (``step``
   records every ``--log-every`` steps, one ``epoch`` record per epoch, summed over all ranks),
   a loss-curve PNG, a sample grid per epoch, and warnings (e.g. a dead MCL expert) printed
   loudly and logged;
6. export: the EMA weights with training metadata, through ``task.export``; the metadata's
   ``history`` keeps the loss curve and the sample grids after epochs 1, 5 and the last
   (``training_history``), for the Models tab.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .data import MNISTNotFound, load_mnist
from .runlog import Progress, ResumeState, _jsonable, plot_losses, training_history, truncate_metrics

# ---------------------------------------------------------------------------------------------
# Command line


def common_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """Arguments every training script shares; ``defaults`` overrides per script."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--channels", type=int, default=32, help="UNet base width")
    p.add_argument("--blocks", type=int, default=2, help="ResBlocks per UNet level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype of forward passes: auto is bf16 on CUDA and on CPUs with native bf16 "
                        "(avx512_bf16 / amx_bf16 / arm bf16), fp32 elsewhere; losses, optimizer state and EMA stay fp32")
    p.add_argument("--no-bf16", action="store_true", help="same as --precision fp32 (kept for older commands)")
    p.add_argument("--recipe", choices=("auto", "cpu", "gpu"), default="auto",
                   help="the script's defaults for a device: auto picks gpu on CUDA, cpu elsewhere; explicit flags still win")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="end this invocation after this many minutes of training (time in the loop); the LR schedule still spans --epochs, --resume carries on")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation at this optimizer step; the LR schedule still spans --epochs, --resume carries on")
    p.add_argument("--snapshot-every", type=int, default=None, metavar="STEPS",
                   help="also export the EMA weights every STEPS optimizer steps to <run-dir>/snapshots/ (for quality-vs-training curves)")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--run-dir", default=None, help="logs, grids and resume state (default runs/<name>, runs/<name>-quick with --quick)")
    p.add_argument("--out", default=None, help="exported checkpoint (default checkpoints/<name>.safetensors, <run-dir>/<name>.safetensors with --quick)")
    p.add_argument("--resume", action="store_true", help="carry on from <run-dir>/state.pt if it exists")
    p.add_argument("--save-every", type=int, default=500, help="steps between resume saves (and at every epoch end); 0: epoch ends only")
    p.add_argument("--log-every", type=int, default=50, help="steps between step records in metrics.jsonl")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, at most 2 epochs, a tiny network, "
                   "outputs under runs/<name>-quick (never over the shipped checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(**defaults)
    return p


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (x86 avx512_bf16 or AMX, Arm bf16). Elsewhere bf16
    is emulated and slower than fp32, so ``--precision auto`` stays in fp32 there."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux: no cheap, reliable way to tell; stay with fp32
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for ``device`` (see ``--precision``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def channels_last_for(device: torch.device):
    """Memory format of the network and the images: channels_last on CUDA; contiguous on the CPU,
    where channels_last made bf16 training 29% slower (391 -> 279 images/s, this project's 2-core
    CPU, batch 128, one ResBlock per level)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def recipe_for(recipe: str, device: str | None) -> str:
    """``auto`` -> ``gpu`` when training runs on CUDA (``--device``, else CUDA when available), else ``cpu``."""
    if recipe != "auto":
        return recipe
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "gpu" if str(dev).startswith("cuda") else "cpu"


def parse_args(parser: argparse.ArgumentParser, recipes: dict[str, dict], argv=None):
    """Parse with the defaults of the recipe for the device (``--recipe``): ``recipes`` maps
    ``cpu`` / ``gpu`` to parser defaults. Flags given on the command line override the recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # -h shows the recipe's defaults
    name = recipe_for(pre.recipe, pre.device)
    recipe = dict(recipes.get(name, {}))
    if pre.quick:
        recipe.pop("init", None)  # a smoke run starts from scratch on its tiny network
        recipe.pop("init_weights_only", None)
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.recipe = name
    return args


def apply_quick(args) -> None:
    """``--quick``: shrink everything for a smoke run (explicit smaller values are kept)."""
    if args.quick:
        args.limit = args.limit or 512
        args.epochs = min(args.epochs, 2)
        args.batch_size = min(args.batch_size, 64)
        args.channels = min(args.channels, 8)
        args.blocks = 1
        args.warmup_steps = min(args.warmup_steps, 5)
        args.save_every = min(args.save_every, 4) if args.save_every else 0
        args.log_every = 1


def check_args(args) -> None:
    """Reject nonsensical settings with one clear message (exit status 2, like argparse)."""
    bad = []
    for name, low in [("epochs", 1), ("batch_size", 1), ("warmup_steps", 0), ("save_every", 0), ("log_every", 1), ("channels", 1), ("blocks", 1)]:
        if getattr(args, name, low) < low:
            bad.append(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(args, name)})")
    for name in ("max_steps", "limit", "stop_at", "snapshot_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if not args.lr > 0:
        bad.append(f"--lr must be positive (got {args.lr})")
    if not 0 <= args.ema_decay < 1:
        bad.append(f"--ema-decay must be in [0, 1) (got {args.ema_decay})")
    if args.max_minutes is not None and not args.max_minutes > 0:
        bad.append(f"--max-minutes must be positive (got {args.max_minutes})")
    if not args.grad_clip > 0:
        bad.append(f"--grad-clip must be positive (got {args.grad_clip})")
    if bad:
        fail("; ".join(bad), status=2)


def fail(message: str, status: int = 1):
    """Exit with ``error: message`` on stderr (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """What one training script trains. Subclasses set ``name`` and implement the methods.

    ``train`` sets ``task.device`` before calling ``build``."""

    name = "task"
    device: torch.device | None = None

    def __init__(self, args):
        self.args = args

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator, progress: float,
             index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Scalar loss and a dict of numbers to log (floats or tensors, summed over the epoch and
        over ranks). ``model`` is the wrapped model (DDP / compiled): call it, do not reach into it,
        or DDP will not synchronise gradients. ``index``: the batch's positions in the training set."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the task itself learns besides the model (MCL's per-example assignment), for the
        resume state; tensors only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def epoch_summary(self, sums: dict, count: int) -> dict:
        """The epoch record from the summed logs of ``count`` steps (all ranks together). A
        ``warnings`` list in the record is printed loudly by rank 0 and kept in metrics.jsonl."""
        return {k: float(v) / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, path: Path) -> dict | None:
        """Write a PNG from the EMA model (rank 0, every epoch end); may return numbers for the
        epoch record (e.g. a test accuracy)."""

    def export(self, model: nn.Module, path: Path, training: dict) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Helpers


def _dist_setup() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = os.environ.get("DIFFUSION_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(perm: torch.Tensor, batch: int, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """Indices of global batch ``batch`` of an epoch's permutation that rank ``rank`` trains on:
    consecutive slices of the permutation, so the ranks never share an image within an epoch."""
    start = (batch * world + rank) * batch_size
    return perm[start:start + batch_size]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# The loop


def train(task: Task, args) -> dict:
    """Train ``task`` with the shared loop (see the module docstring); returns the training
    metadata stored in the exported checkpoint."""
    # -- setup
    apply_quick(args)
    check_args(args)
    rank, world = _dist_setup()
    is_main = rank == 0
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        fail(f"--device {args.device}: {e}", status=2)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for CUDA, and no CUDA device is available (use --device cpu)", status=2)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    task.device = device
    precision = resolve_precision("fp32" if args.no_bf16 else args.precision, device)
    use_bf16 = precision == "bf16"
    memory_format = channels_last_for(device)
    default_dir = Path("runs") / (f"{task.name}-quick" if args.quick else task.name)
    run_dir = Path(args.run_dir or default_dir)
    out = Path(args.out or (run_dir / f"{task.name}.safetensors" if args.quick else Path("checkpoints") / f"{task.name}.safetensors"))
    state_path, metrics_path = run_dir / "state.pt", run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # -- data: the whole training set as one tensor on the device
    try:
        images, labels = load_mnist(args.data_dir, train=True)
    except MNISTNotFound as e:
        fail(str(e))
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    n = len(images)
    per_step = args.batch_size * world  # images per optimizer step, all ranks together
    if n < per_step:
        fail(f"{n} training images are fewer than one batch of {args.batch_size} x {world} process(es); lower --batch-size or raise --limit", status=2)
    steps_per_epoch = n // per_step  # the remainder of each permutation is skipped
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    # -- model, EMA, optimizer, schedule (same init on every rank; DDP also broadcasts rank 0's)
    torch.manual_seed(args.seed)
    model = task.build().to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup_steps, total_steps))
    torch.manual_seed(args.seed * 1000 + rank)  # global RNG (dropout): different per rank
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # noise, labels, augmentation

    # -- resume (runlog.ResumeState): the progress of the run so far, or a fresh one
    state = ResumeState(state_path, rank, world, device)
    resumed = args.resume and state_path.exists()
    if resumed:
        p = state.restore(args, model, ema, opt, sched, gen, task, fail)
        if is_main:
            print(f"resumed from {state_path} at step {p.step} (epoch {p.epoch}, batch {p.batch_in_epoch})", flush=True)
    else:
        p = Progress()
        if is_main:
            if args.resume:
                print(f"no resume state at {state_path}; starting from step 0", flush=True)
            for stale in (state_path, metrics_path):  # a fresh run replaces an earlier one in this run dir
                stale.unlink(missing_ok=True)
    history = truncate_metrics(metrics_path, p.step) if resumed and is_main else []
    last_record = next((r for r in reversed(history) if r.get("type") == "epoch"), {})

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    def log(rec: dict):
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- the loop
    t_start = t_epoch = time.perf_counter()
    save = lambda: state.save(p, p.wall_before + time.perf_counter() - t_start, args, model, ema, opt, sched, gen, task)  # noqa: E731
    timed = 0  # steps of this epoch run by this process (for images/s after a resume)
    out_of_time = bool(args.stop_at and p.step >= args.stop_at)  # --max-minutes or --stop-at reached
    bar = tqdm(total=total_steps, initial=p.step, disable=not is_main or args.no_progress, desc=task.name, dynamic_ncols=True)
    model.train()
    while p.step < total_steps:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 7919 + p.epoch)).to(device)
        while p.batch_in_epoch < steps_per_epoch and p.step < total_steps and not out_of_time:
            t_step = time.perf_counter()
            idx = shard_indices(perm, p.batch_in_epoch, rank, world, args.batch_size)
            x0, y = images[idx], labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, logs = task.loss(train_model, x0, y, gen, p.step / max(1, total_steps), index=idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            ema_update(ema, model, min(args.ema_decay, (1 + p.step) / (10 + p.step)))
            p.step += 1
            p.batch_in_epoch += 1
            p.count += 1
            timed += 1
            for k, v in dict(logs, loss=loss).items():
                p.sums[k] = p.sums.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else v)
            if p.step % args.log_every == 0 or p.step == total_steps:
                lv = loss.item()
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                log({"type": "step", "step": p.step, "epoch": p.epoch, "loss": lv, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]})
            bar.update(1)
            p.train_s += time.perf_counter() - t_step
            if args.max_minutes:
                out_of_time = p.train_s >= 60 * args.max_minutes
                if world > 1:  # rank 0's clock decides, so every rank stops at the same step
                    flag = torch.tensor(float(out_of_time), device=device)
                    dist.broadcast(flag, 0)
                    out_of_time = bool(flag.item())
            if args.stop_at and p.step >= args.stop_at:
                out_of_time = True
            if args.snapshot_every and p.step % args.snapshot_every == 0 and is_main:
                snap = run_dir / "snapshots" / f"{task.name}_step{p.step:07d}.safetensors"
                snap.parent.mkdir(exist_ok=True)
                seen = {"steps": p.step, "images_seen": p.step * per_step, "train_minutes": round(p.train_s / 60, 3)}
                task.export(ema, snap, dict(seen, snapshot=True))
                log({"type": "snapshot", "step": p.step, "images_seen": seen["images_seen"], "train_minutes": seen["train_minutes"], "path": str(snap)})
            if args.save_every and p.step % args.save_every == 0 and p.batch_in_epoch < steps_per_epoch:
                save()

        if out_of_time and p.batch_in_epoch < steps_per_epoch:  # --max-minutes, mid-epoch: resumable where it stopped
            save()
            if is_main:
                bar.write(f"stopped at step {p.step} (--max-minutes / --stop-at); --resume carries on")
            break

        # end of an epoch (or of the run, when --max-steps stops it early): sum over ranks, log
        if world > 1:
            for k in sorted(p.sums):
                t = torch.as_tensor(p.sums[k], device=device, dtype=torch.float32).clone()
                dist.all_reduce(t)
                p.sums[k] = t
            t = torch.tensor(float(p.count), device=device)
            dist.all_reduce(t)
            p.count = int(t.item())
        dt = time.perf_counter() - t_epoch
        record = {"type": "epoch", "epoch": p.epoch, "step": p.step, "seconds": round(dt, 3),
                  "images_per_s": round(timed * per_step / max(dt, 1e-9), 1), **task.epoch_summary(p.sums, p.count)}
        if is_main:
            ema.eval()
            record.update(task.sample_grid(ema, run_dir / f"samples_epoch{p.epoch:03d}.png") or {})
            log(record)
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k not in ("type", "warnings")))
            for w in record.get("warnings", []):
                bar.write(f"WARNING (epoch {p.epoch}): {w}", file=sys.stderr)
            plot_losses(metrics_path, run_dir / "loss.png")
        last_record = record
        p.epoch += 1
        p.batch_in_epoch = 0
        p.sums, p.count, timed = {}, 0, 0
        save()
        t_epoch = time.perf_counter()
        if out_of_time:
            break
    bar.close()

    # -- export the EMA weights (rank 0), after checking that the replicas agree
    if world > 1:
        check = torch.stack([p.detach().float().sum() for p in model.parameters()])
        lo, hi = check.clone(), check.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if not torch.allclose(lo, hi, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"DDP replicas diverged (max parameter-sum gap {float((hi - lo).abs().max()):.3g}): gradients were not synchronised")
    wall = p.wall_before + time.perf_counter() - t_start
    training = {
        "epochs": p.epoch, "steps": p.step, "batch_size": per_step, "lr": args.lr, "ema_decay": args.ema_decay,
        "seed": args.seed, "images": n, "images_seen": p.step * per_step, "wall_time_s": round(wall, 1), "device": device_name(device),
        "world_size": world, "precision": precision, "bf16": use_bf16, "recipe": getattr(args, "recipe", None),
        "train_time_s": round(p.train_s, 1), "torch": torch.__version__, "quick": bool(args.quick),
        "final": {k: v for k, v in last_record.items() if k not in ("type", "warnings")}, "args": _jsonable(args),
    }
    if is_main:
        training["history"] = training_history(run_dir, metrics_path, p.epoch)
        task.export(ema, out, training)
        print(f"exported {out} ({out.stat().st_size / 2**20:.2f} MiB) after {p.step} steps in {wall:.1f} s", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return training
