"""Images per second of our training loop against a plain fp32 DataLoader loop, and of MCL.

    python train/benchmark_loop.py                        # this machine's cfg recipe (CPU: batch 128, one ResBlock a level, EDM, bf16 where native)
    python train/benchmark_loop.py --compile              # ours with torch.compile
    python train/benchmark_loop.py --device cpu --steps 5 --channels 8 --blocks 1 --batch-size 32 --mcl-experts 2   # smoke

All loops train the UNet of train/cfg.py's recipe for the device (same initialisation, same objective;
on a CPU the shipped cfg's: one ResBlock per level, EDM), one after the
other in one process; each runs ``--warmup`` untimed steps (torch.compile compiles there), then
``--steps`` timed ones:

* ours, the inner loop of ``diffusion_core.training.train``: MNIST preloaded as one tensor on the
  device, batches by indexing a seeded permutation, channels_last on CUDA, autocast per ``--precision``
  (``auto``: bf16 on CUDA and on CPUs with native bf16, else fp32), optional ``--compile``, AdamW
  with warmup and cosine decay, gradient clipping and the EMA update;
* plain: ``torchvision.datasets.MNIST`` with ``ToTensor()`` and ``Normalize((0.5,), (0.5,))``
  through a shuffling ``torch.utils.data.DataLoader`` (``--num-workers``, default 0 as in
  DataLoader), each batch copied to the device, fp32, AdamW, no clipping, no EMA;
* MCL (``--mcl-experts K``, 0 to skip): our loop on K unconditional hypotheses of the same UNet:
  train/mcl.py's default, which made mcl_parts and mcl_shared (``mcl-shared``: one trunk with K heads and a score head, see
  diffusion_core/mcl_training.py), then an ensemble of K separate UNets with annealed WTA, once
  with the routed update (a no-grad pass scores every expert, then each example trains one expert)
  and once with the full update (every expert forward and backward on every example).

Images per second count training images through forward, backward and the optimizer step
(CUDA is synchronised before the clock is read). Prints a table and writes JSON (``--json``).
"""
import argparse
import copy
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from cfg import RECIPES as CFG_RECIPES  # train/cfg.py, beside this file (Python puts a script's folder on its path)

from diffusion_core.data import MNISTNotFound, data_root, load_mnist
from diffusion_core.mcl_training import MCLTask
from diffusion_core.tasks import DiffusionTask
from diffusion_core.training import (
    PRECISIONS,
    channels_last_for,
    device_name,
    ema_update,
    lr_factor,
    resolve_precision,
    shard_indices,
)

MCL_LOOPS = ("shared", "routed", "full")
SHARED = {"wta": "hard", "wta_scope": "example", "head_blocks": 1}  # mcl_shared's command: train/mcl.py --mcl-arch shared --wta-scope example --wta hard


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on CPU, 256 on CUDA (the recipes)")
    p.add_argument("--channels", type=int, default=32, help="UNet base width (train/cfg.py default)")
    p.add_argument("--blocks", type=int, default=None, help="ResBlocks per UNet level (default: train/cfg.py's recipe, 1 on CPU, 2 on CUDA)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--compile", action="store_true", help="torch.compile our loop's model")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="our loop's autocast (see train/cfg.py -h)")
    p.add_argument("--objective", choices=["ddpm_eps", "edm", "rectified_flow"], default=None,
                   help="default: train/cfg.py's recipe, edm on CPU, ddpm_eps on CUDA")
    p.add_argument("--mcl-experts", type=int, default=5, help="K for the MCL rows (0: no MCL rows)")
    p.add_argument("--mcl-loops", default=",".join(MCL_LOOPS), help=f"comma-separated MCL rows, some of {','.join(MCL_LOOPS)} "
                   "(shared: train/mcl.py's default; routed and full: the separate ensemble's updates)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the plain loop")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="runs/benchmark_loop.json", help="where to write the results")
    args = p.parse_args(argv)
    args.mcl_loops = [x.strip() for x in args.mcl_loops.split(",") if x.strip()]
    if not args.mcl_loops or any(x not in MCL_LOOPS for x in args.mcl_loops):
        p.error(f"--mcl-loops must be some of {','.join(MCL_LOOPS)}")
    if args.steps < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 1) or args.mcl_experts < 0:
        p.error("--steps and --batch-size must be at least 1, --warmup and --mcl-experts at least 0")
    return args


def _task_args(args, **extra) -> SimpleNamespace:
    return SimpleNamespace(objective=args.objective, min_snr_gamma=None, schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           attention=True, channels=args.channels, blocks=args.blocks, init=None, **extra)


def task_for(args) -> DiffusionTask:
    """The CFG task of train/cfg.py (linear schedule for eps, p_uncond 0.1)."""
    return DiffusionTask(_task_args(args, p_uncond=0.1), name="cfg", conditional=True)


def mcl_task_for(args, update: str, arch: str = "separate") -> MCLTask:
    """The MCL task of train/mcl.py: K experts, annealed WTA, ``update`` routed or full; ``arch="shared"``:
    the mcl_shared command (one trunk, K heads of ``SHARED["head_blocks"]`` blocks and a score head,
    per-example winners, ``SHARED["wta"]`` WTA)."""
    if arch == "shared":
        return MCLTask(_task_args(args, experts=args.mcl_experts, wta=SHARED["wta"], relax_eps=0.05, t_start=0.05, t_end=1e-5,
                                  mcl_update="routed", mcl_arch="shared", wta_scope=SHARED["wta_scope"],
                                  head_blocks=SHARED["head_blocks"], assign_momentum=0.5, score_weight=0.1, limit=None,
                                  data_dir=args.data_dir, seed=args.seed))  # its k-means start reads the training set (in the untimed warm-up)
    return MCLTask(_task_args(args, experts=args.mcl_experts, wta="annealed", relax_eps=0.05, t_start=0.05, t_end=1e-5, mcl_update=update))


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


def our_loop(args, device, task=None, name="ours") -> dict:
    """The inner loop of diffusion_core.training.train, step for step (one process)."""
    task = task or task_for(args)
    precision = resolve_precision(args.precision, device)
    use_bf16 = precision == "bf16"
    memory_format = channels_last_for(device)
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
            loss, _ = task.loss(train_model, x0, y, gen, i / total, index=idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(0.999, (1 + i) / (10 + i)))
        return loss.detach()

    what = ["preloaded tensor"] + (["channels_last"] if memory_format == torch.channels_last else []) + (["bf16 autocast"] if use_bf16 else ["fp32"]) + (["compiled"] if args.compile else [])
    if isinstance(task, MCLTask):
        what = ([f"MCL K={args.mcl_experts}, shared trunk, {task.head_blocks} head block(s), {task.args.wta} WTA per {task.scope}"] if task.arch == "shared"
                else [f"MCL K={args.mcl_experts}, {task.args.mcl_update} update"]) + what
    return {"loop": name, "what": ", ".join(what), **timed(step, args, device)}


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
        raise SystemExit(f"error: {e}") from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    recipe = CFG_RECIPES["gpu" if device.type == "cuda" else "cpu"]
    if args.batch_size is None:
        args.batch_size = recipe.get("batch_size", 128)
    if args.blocks is None:
        args.blocks = recipe.get("blocks", 2)
    if args.objective is None:
        args.objective = recipe.get("objective", "ddpm_eps")
    results = [our_loop(args, device), plain_loop(args, device)]
    if args.mcl_experts:
        if "shared" in args.mcl_loops:
            results += [our_loop(args, device, mcl_task_for(args, "routed", "shared"), "mcl-shared")]
        results += [our_loop(args, device, mcl_task_for(args, u), f"mcl-{u}") for u in ("routed", "full") if u in args.mcl_loops]
    ours, plain = results[0]["images_per_s"], results[1]["images_per_s"]
    for r in results:
        r["speedup_vs_plain"] = r["images_per_s"] / plain
        r["share_of_ours"] = r["images_per_s"] / ours
    params = sum(p.numel() for p in task_for(args).build().parameters())
    report = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "network": {"kind": "unet (cfg)", "channels": args.channels, "blocks": args.blocks, "parameters": params},
              "batch_size": args.batch_size, "precision": resolve_precision(args.precision, device), "objective": args.objective, "steps": args.steps, "warmup": args.warmup, "results": results}

    print(f"{report['device']}, torch {torch.__version__}; UNet {params / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup")
    print(f"{'loop':10} {'images/s':>10} {'ms/step':>9} {'vs plain':>9} {'vs ours':>8}  what")
    for r in results:
        print(f"{r['loop']:10} {r['images_per_s']:>10.0f} {r['ms_per_step']:>9.1f} {r['speedup_vs_plain']:>8.2f}x {r['share_of_ours']:>7.0%}  {r['what']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
