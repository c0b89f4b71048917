"""Images per second of our training loop against a plain fp32 DataLoader loop, same network.

    python train/benchmark_loop.py                        # on the GPU: the CFG UNet of train/cfg.py
    python train/benchmark_loop.py --compile              # ours with torch.compile
    python train/benchmark_loop.py --device cpu --steps 5 --channels 8 --blocks 1 --batch-size 32   # smoke

Both loops train the same network (the class-conditional UNet of train/cfg.py, same
initialisation) with the same objective and label dropout, one after the other in one process;
each runs ``--warmup`` untimed steps (torch.compile compiles there), then ``--steps`` timed ones:

* ours, the inner loop of ``diffusion_core.training.train``: MNIST preloaded as one tensor on the
  device, batches by indexing a seeded permutation, channels_last, bf16 autocast on CUDA
  (``--no-bf16`` to disable), optional ``--compile``, AdamW with warmup and cosine decay,
  gradient clipping and the EMA update;
* plain: ``torchvision.datasets.MNIST`` with ``ToTensor()`` and ``Normalize((0.5,), (0.5,))``
  through a shuffling ``torch.utils.data.DataLoader`` (``--num-workers``, default 0 as in
  DataLoader), each batch copied to the device, fp32, AdamW, no clipping, no EMA.

Images per second count training images through forward, backward and the optimizer step
(CUDA is synchronised before the clock is read). Prints a table and writes JSON (``--json``).
"""
import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffusion_core.data import MNISTNotFound, data_root, load_mnist  # noqa: E402
from diffusion_core.tasks import DiffusionTask  # noqa: E402
from diffusion_core.training import device_name, ema_update, lr_factor, shard_indices  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--channels", type=int, default=32, help="UNet base width (train/cfg.py default)")
    p.add_argument("--blocks", type=int, default=2, help="ResBlocks per UNet level (train/cfg.py default)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--compile", action="store_true", help="torch.compile our loop's model")
    p.add_argument("--no-bf16", action="store_true", help="our loop without bf16 autocast on CUDA")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the plain loop")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="runs/benchmark_loop.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be at least 1, --warmup at least 0")
    return args


def task_for(args) -> DiffusionTask:
    """The CFG task of train/cfg.py with its defaults (eps objective, linear schedule, p_uncond 0.1)."""
    return DiffusionTask(SimpleNamespace(objective="ddpm_eps", schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                         attention=True, channels=args.channels, blocks=args.blocks, p_uncond=0.1),
                         name="cfg", conditional=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, args, device) -> dict:
    """Run ``step(i)`` for warmup + timed steps; returns images/s over the timed ones."""
    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    final_loss = float(loss)  # also waits for the device
    sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": args.steps * args.batch_size / dt, "ms_per_step": 1000 * dt / args.steps,
            "seconds": dt, "final_loss": final_loss}


def our_loop(args, device) -> dict:
    """The inner loop of diffusion_core.training.train, step for step (one process)."""
    task = task_for(args)
    use_bf16 = device.type == "cuda" and not args.no_bf16
    memory_format = torch.channels_last
    images, labels = load_mnist(args.data_dir, train=True)
    images, labels = images.to(device).contiguous(memory_format=memory_format), labels.to(device)
    n, total = len(images), args.warmup + args.steps
    steps_per_epoch = n // args.batch_size
    torch.manual_seed(args.seed)
    model = task.build().to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, min(200, total // 10), total))
    train_model = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(args.seed)
    perm = None
    model.train()

    def step(i):
        nonlocal perm
        epoch, batch = divmod(i, steps_per_epoch)
        if batch == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).to(device)
        idx = shard_indices(perm, batch, 0, 1, args.batch_size)
        x0, y = images[idx], labels[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, _ = task.loss(train_model, x0, y, gen, i / total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(0.999, (1 + i) / (10 + i)))
        return loss.detach()

    what = ["preloaded tensor", "channels_last"] + (["bf16 autocast"] if use_bf16 else ["fp32"]) + (["compiled"] if args.compile else [])
    return {"loop": "ours", "what": ", ".join(what), **timed(step, args, device)}


def plain_loop(args, device) -> dict:
    """A textbook loop: torchvision dataset with per-sample transforms, DataLoader, fp32."""
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import MNIST

    task = task_for(args)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = MNIST(str(data_root(args.data_dir)), train=True, download=False, transform=transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = task.build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = iter(loader)
    model.train()

    def step(i):
        nonlocal batches
        try:
            x0, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x0, y = next(batches)
        x0, y = x0.to(device), y.to(device)
        loss, _ = task.loss(model, x0, y, gen, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return {"loop": "plain", "what": f"DataLoader (num_workers={args.num_workers}), ToTensor+Normalize, fp32", **timed(step, args, device)}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, and no CUDA device is available")
    try:
        load_mnist(args.data_dir, train=False)  # fail early and clearly when MNIST is missing
    except MNISTNotFound as e:
        raise SystemExit(f"error: {e}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = [our_loop(args, device), plain_loop(args, device)]
    plain = results[1]["images_per_s"]
    for r in results:
        r["speedup_vs_plain"] = r["images_per_s"] / plain
    params = sum(p.numel() for p in task_for(args).build().parameters())
    report = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "network": {"kind": "unet (cfg)", "channels": args.channels, "blocks": args.blocks, "parameters": params},
              "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "results": results}

    print(f"{report['device']}, torch {torch.__version__}; UNet {params / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup")
    print(f"{'loop':6} {'images/s':>10} {'ms/step':>9} {'speedup':>8}  what")
    for r in results:
        print(f"{r['loop']:6} {r['images_per_s']:>10.0f} {r['ms_per_step']:>9.1f} {r['speedup_vs_plain']:>7.2f}x  {r['what']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
