"""The one training loop behind train/{ddpm,cfg,mcl,gating,classifier}.py.

A ``Task`` says what differs between the scripts (which networks, which loss, what to export);
``train(task, args)`` does the rest, top to bottom: MNIST preloaded as one tensor on the device,
AdamW with linear warmup and cosine decay, gradient clipping, EMA weights (the ones exported),
bf16 autocast and channels_last on CUDA, optional torch.compile, DistributedDataParallel under
torchrun (rank 0 logs and saves), a metrics.jsonl, a loss-curve PNG and a sample grid per epoch,
and ``--resume`` from a state file written atomically, so a run killed at any moment carries on
from its last save.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .data import MNISTNotFound, load_mnist


# ---------------------------------------------------------------------------------------------
# Command line


def common_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """Arguments every training script shares; ``defaults`` overrides per script."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
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
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--run-dir", default=None, help="logs, grids and resume state (default runs/<name>)")
    p.add_argument("--out", default=None, help="exported checkpoint (default checkpoints/<name>.safetensors)")
    p.add_argument("--resume", action="store_true", help="carry on from <run-dir>/state.pt if it exists")
    p.add_argument("--save-every", type=int, default=500, help="steps between resume saves (and at every epoch end)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, 2 epochs, a tiny network")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(**defaults)
    return p


def apply_quick(args) -> None:
    if args.quick:
        args.limit = args.limit or 512
        args.epochs = min(args.epochs, 2)
        args.batch_size = min(args.batch_size, 64)
        args.channels = min(args.channels, 8)
        args.blocks = 1
        args.warmup_steps = min(args.warmup_steps, 5)
        args.save_every = min(args.save_every, 4)


# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """What one training script trains. Subclasses set ``name`` and implement the methods."""

    name = "task"
    needs_labels = False

    def __init__(self, args):
        self.args = args

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator, progress: float) -> tuple[torch.Tensor, dict]:
        """Scalar loss and a dict of numbers to log (floats or tensors to be summed over the epoch)."""
        raise NotImplementedError

    def epoch_summary(self, sums: dict, count: int) -> dict:
        """Turn the epoch's summed logs into the epoch record (rank 0 prints it)."""
        return {k: float(v) / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, path: Path) -> None:
        """Write a PNG of samples from the EMA model (optional)."""

    def export(self, model: nn.Module, path: Path, training: dict) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Helpers


def _dist_setup():
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DIFFUSION_DIST_BACKEND", "") != "gloo" else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "step":
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# The loop


def train(task: Task, args) -> dict:
    apply_quick(args)
    rank, world = _dist_setup()
    is_main = rank == 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    use_bf16 = device.type == "cuda" and not args.no_bf16
    memory_format = torch.channels_last
    run_dir = Path(args.run_dir or Path("runs") / task.name)
    out = Path(args.out or Path("checkpoints") / f"{task.name}.safetensors")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # Data: the whole training set as one tensor on the device.
    try:
        images, labels = load_mnist(args.data_dir, train=True)
    except MNISTNotFound as e:
        raise SystemExit(f"error: {e}")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    n = len(images)
    per_step = args.batch_size * world
    steps_per_epoch = max(1, n // per_step)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    model = task.build().to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup_steps, total_steps))
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    step, epoch, batch_in_epoch, wall_before = 0, 0, 0, 0.0
    state_path = run_dir / "state.pt"
    metrics_path = run_dir / "metrics.jsonl"
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"].cpu())
        step, epoch, batch_in_epoch, wall_before = st["step"], st["epoch"], st["batch_in_epoch"], st["wall_s"]
        if is_main:
            print(f"resumed from {state_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)
    elif is_main and metrics_path.exists():
        metrics_path.unlink()

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    def save_state():
        if is_main:
            atomic_torch_save(
                {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "gen": gen.get_state(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "wall_s": wall_before + time.perf_counter() - t_start, "args": json.dumps(vars(args), default=str)},
                state_path,
            )
        if world > 1:
            dist.barrier()

    def log(rec: dict):
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    t_start = time.perf_counter()
    last_record = {}
    bar = tqdm(total=total_steps, initial=step, disable=not is_main or args.no_progress, desc=task.name, dynamic_ncols=True)
    while step < total_steps:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).to(device)
        sums, count = {}, 0
        t_epoch = time.perf_counter()
        model.train()
        while batch_in_epoch < steps_per_epoch and step < total_steps:
            idx = perm[(batch_in_epoch * world + rank) * args.batch_size:][: args.batch_size]
            x0, y = images[idx], labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, logs = task.loss(train_model, x0, y, gen, step / max(1, total_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            batch_in_epoch += 1
            count += 1
            for k, v in dict(logs, loss=loss.detach()).items():
                sums[k] = sums.get(k, 0) + v.detach().float() if torch.is_tensor(v) else sums.get(k, 0) + v
            if step % 50 == 0 or step == total_steps:
                lv = loss.item()
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                log({"type": "step", "step": step, "epoch": epoch, "loss": lv, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]})
            bar.update(1)
            if args.save_every and step % args.save_every == 0 and batch_in_epoch < steps_per_epoch:
                save_state()
        if batch_in_epoch >= steps_per_epoch or step >= total_steps:
            if world > 1:
                for k in sorted(sums):
                    t = torch.as_tensor(sums[k], device=device, dtype=torch.float32)
                    dist.all_reduce(t)
                    sums[k] = t / world
            dt = time.perf_counter() - t_epoch
            record = {"type": "epoch", "epoch": epoch, "step": step, "seconds": dt,
                      "images_per_s": count * per_step / max(dt, 1e-9), **task.epoch_summary(sums, count)}
            log(record)
            last_record = record
            if is_main:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "type"))
                ema.eval()
                task.sample_grid(ema, run_dir / f"samples_epoch{epoch:03d}.png")
                plot_losses(metrics_path, run_dir / "loss.png")
            epoch += 1
            batch_in_epoch = 0
            save_state()
    bar.close()
    wall = wall_before + time.perf_counter() - t_start
    training = {
        "epochs": epoch, "steps": step, "batch_size": per_step, "lr": args.lr, "ema_decay": args.ema_decay,
        "seed": args.seed, "images": n, "wall_time_s": round(wall, 1), "device": device_name(device),
        "world_size": world, "bf16": use_bf16, "torch": torch.__version__, "final": {k: v for k, v in last_record.items() if k != "type"},
    }
    if is_main:
        task.export(ema, out, training)
        print(f"exported {out} ({out.stat().st_size / 2**20:.2f} MiB) after {step} steps in {wall:.1f} s", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return training
