"""A training run's files under ``<run-dir>``: metrics.jsonl (step and epoch records), loss.png,
the sample grids, the history the Models tab shows (``training_history``) and the resume state
``state.pt`` (``ResumeState``), which holds everything the loop needs to carry on bit for bit."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file, fsync, then rename over ``path``: a reader (or a rerun after
    SIGKILL) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop the records a killed run wrote after its last save (``step``); returns the rest."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_metrics(metrics_path) if r.get("type") == "step"]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    if all(r["loss"] > 0 for r in recs):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


HISTORY_EPOCHS = (1, 5)  # the sample grids a history keeps besides the last epoch's (1-based)
HISTORY_POINTS = 300  # the loss curve's points at most (means of consecutive step records)


def training_history(run_dir: Path, metrics_path: Path, epochs: int) -> dict:
    """What the Models tab shows of how a model learned: the loss curve (at most ``HISTORY_POINTS``
    ``[step, loss]`` points, each the mean of consecutive step records) and the sample grids
    written after epochs 1, 5 and the last (PNG, base64), read from the run directory. A few tens
    of kB; it is stored in the checkpoint's training metadata."""
    import base64

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("type") == "step"]
    per = max(1, math.ceil(len(steps) / HISTORY_POINTS))
    loss = []
    for i in range(0, len(steps), per):
        chunk = steps[i:i + per]
        loss.append([chunk[-1]["step"], round(sum(r["loss"] for r in chunk) / len(chunk), 6)])
    epoch_steps = {r["epoch"]: r.get("step") for r in records if r.get("type") == "epoch"}
    grids = []
    for epoch in sorted({e for e in HISTORY_EPOCHS if e <= epochs} | ({epochs} if epochs else set())):
        png = run_dir / f"samples_epoch{epoch - 1:03d}.png"
        if png.is_file():
            grids.append({"epoch": epoch, "step": epoch_steps.get(epoch - 1), "png": base64.b64encode(png.read_bytes()).decode("ascii")})
    return {"loss": loss, "grids": grids}


def _to(obj, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in obj.items()}


def _jsonable(args) -> dict:
    return json.loads(json.dumps(vars(args), default=str))


@dataclass
class Progress:
    """Where a run is: its counters, its clocks and the running sums of the epoch (this rank's)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    wall_before: float = 0.0  # wall seconds of the earlier invocations of this run
    train_s: float = 0.0  # seconds inside the step loop (no grids, no saves), all invocations
    sums: dict = field(default_factory=dict)
    count: int = 0  # steps summed in ``sums``


class ResumeState:
    """``state.pt``: the model, EMA, optimizer, schedule, progress, every rank's random generators
    and the epoch's sums, written atomically, so a run killed with SIGKILL and rerun with
    ``--resume`` continues from its last save on the same permutation at the same batch. Keys:
    ``model ema opt sched gen step epoch batch_in_epoch wall_s train_s args ranks task`` (older
    files lack the last two)."""

    def __init__(self, path: Path, rank: int, world: int, device: torch.device):
        self.path, self.rank, self.world, self.device = path, rank, world, device

    def restore(self, args, model, ema, opt, sched, gen: torch.Generator, task, fail) -> Progress:
        """Load the state into the objects given; ``fail(message)`` for an unreadable file or a
        different network (naming the flags that differ from the saved run)."""
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable for whatever reason
            fail(f"cannot read the resume state {self.path} ({type(e).__name__}: {e}); delete it or run without --resume")
        try:
            model.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
        except RuntimeError as e:
            saved = json.loads(st.get("args", "{}"))
            diff = {k: (saved[k], v) for k, v in _jsonable(args).items() if k in saved and saved[k] != v and k not in ("resume",)}
            fail(f"{self.path} holds a different network ({str(e).splitlines()[0]}); flags that differ from the saved run "
                 f"(saved, now): {diff}. Use the saved run's flags or another --run-dir")
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        p = Progress(st["step"], st["epoch"], st["batch_in_epoch"], st["wall_s"], float(st.get("train_s", st["wall_s"])))
        task.load_state_dict(st.get("task") or {})
        ranks = st.get("ranks")
        if ranks is not None and len(ranks) == self.world:
            mine = ranks[self.rank]
            gen.set_state(mine["gen"])
            torch.set_rng_state(mine["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in mine:
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
            p.sums, p.count = _to(mine["sums"], self.device), mine["count"]
        elif self.rank == 0:
            gen.set_state(st["gen"])  # an older state file (or another world size): rank 0's noise only
        else:
            gen.manual_seed(args.seed * 1000 + self.rank + 7919 * p.step)
        return p

    def save(self, p: Progress, wall_s: float, args, model, ema, opt, sched, gen: torch.Generator, task) -> None:
        """Write the state (rank 0), every rank's generators and sums gathered into it."""
        mine = {"gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "sums": _to(p.sums, "cpu"), "count": p.count}
        if self.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        if self.rank == 0:
            atomic_torch_save(
                {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "gen": gen.get_state(), "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
                 "wall_s": wall_s, "train_s": p.train_s, "args": json.dumps(vars(args), default=str), "ranks": ranks,
                 "task": task.state_dict()},
                self.path,
            )
        if self.world > 1:
            dist.barrier()
