"""Every figure of the evaluation (matplotlib Figure objects, no pyplot state, so the app can
use them too) and ``make_figures``, which writes those whose models are available."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from .. import metrics
from ..mcl import routing_needs_gate
from ..palette import FLOOR_COLOR, expert_color, sampler_color
from ..pipeline import Settings
from .config import FIGURES, NUM_CLASSES, EvalConfig, Row, _log, expand_routings
from .diagnosis import (
    TrajectoryStrip,
    expert_usage_by_sigma,
    routing_usage,
    trajectory_strip,
)
from .sampling import Models, sample_row, to_float

# Figures (matplotlib Figure objects, no pyplot state: usable by the app as well)


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _expert_handles(num_experts: int):
    from matplotlib.patches import Patch

    return [Patch(facecolor=expert_color(k), label=f"expert {k}") for k in range(num_experts)]


def plot_trajectories(strips: list[TrajectoryStrip], num_experts: int, title: str = ""):
    """Rows: routing strategies; columns: denoising steps (the predicted clean image); the frame
    of each image has the colour of the expert that made the prediction; last column: the sample."""
    cols = max(len(s.images) for s in strips) + 1
    fig = _figure(figsize=(1.25 * cols + 1.4, 1.35 * len(strips) + 1.4), layout="constrained")
    axes = fig.subplots(len(strips), cols, squeeze=False)
    for r, strip in enumerate(strips):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(strip.images):
                ax.imshow(strip.images[c].numpy(), cmap="gray", vmin=0, vmax=255)
                k = strip.experts[c]
                for sp in ax.spines.values():
                    sp.set_edgecolor("#999999" if k is None else expert_color(k))
                    sp.set_linewidth(1 if k is None else 3.5)
                if r == 0:
                    ax.set_title(f"step {strip.steps[c] + 1}\nσ={strip.sigmas[c]:.3g}", fontsize=8)
            elif c == cols - 1:
                ax.imshow(strip.final.numpy(), cmap="gray", vmin=0, vmax=255)
                if r == 0:
                    ax.set_title("sample", fontsize=8)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(strip.label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title or "Denoising trajectories by routing (predicted clean image; frame: expert used)", fontsize=10)
    fig.legend(handles=_expert_handles(num_experts), loc="outside lower center", ncol=min(num_experts, 8), fontsize=8, frameon=False)
    return fig


def usage_bin_edges(sigma: torch.Tensor) -> torch.Tensor:
    """Edges (P+1,) around decreasing levels (P,): geometric midpoints, outer edges mirrored in log space."""
    ls = torch.as_tensor(sigma, dtype=torch.float64).log()
    if len(ls) == 1:
        return torch.exp(torch.stack([ls[0] + 0.5, ls[0] - 0.5]))
    mid = (ls[1:] + ls[:-1]) / 2
    return torch.exp(torch.cat([ls[:1] + (ls[0] - mid[0]), mid, ls[-1:] - (mid[-1] - ls[-1])]))


def plot_expert_usage(sigma: torch.Tensor, fractions: torch.Tensor, title: str = ""):
    """Stacked area of the share of samples routed to each expert, over the noise level."""
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    k = fractions.shape[1]
    edges = usage_bin_edges(sigma)
    y = torch.cat([fractions, fractions[-1:]]).T.numpy()  # each level's shares hold over its bin
    ax.stackplot(edges.numpy(), y, colors=[expert_color(i) for i in range(k)], labels=[f"expert {i}" for i in range(k)], step="post", alpha=0.9)
    ax.set_xscale("log")
    ax.set_xlim(float(edges[0]), float(edges[-1]))  # sampling runs from high noise (left) to low
    ax.set_ylim(0, 1)
    ax.set_xlabel("noise level σ (sampling proceeds left to right)")
    ax.set_ylabel("share of samples routed to the expert")
    fig.suptitle(title or "Temporal specialisation: the gated router's choice of expert", fontsize=11)  # spans the legend too
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plot_expert_digits(histograms: list[torch.Tensor], title: str = ""):
    """One panel per expert: the share of each digit (as classified) among its samples."""
    k = len(histograms)
    fig = _figure(figsize=(2.3 * k + 1, 3.2), layout="constrained")
    axes = fig.subplots(1, k, sharey=True, squeeze=False)[0]
    ymax = max(float((h / h.sum()).max()) for h in histograms)
    for i, (ax, h) in enumerate(zip(axes, histograms)):
        frac = (h.double() / h.sum()).numpy()
        ax.bar(range(NUM_CLASSES), frac, color=expert_color(i))
        ax.axhline(1 / NUM_CLASSES, color=FLOOR_COLOR, linestyle="--", linewidth=1, label="uniform")
        cov = metrics.mode_coverage(torch.repeat_interleave(torch.arange(NUM_CLASSES), h.long()), NUM_CLASSES)["num_covered"]
        ax.set_title(f"expert {i}  (n={int(h.sum())})\nentropy {metrics.histogram_entropy(h) + 0.0:.2f}, {cov}/10 digits", fontsize=9)
        ax.set_xticks(range(NUM_CLASSES))
        ax.set_xlabel("digit (classifier)")
        ax.set_ylim(0, min(1.0, ymax * 1.15 + 0.02))
    axes[0].set_ylabel("share of the expert's samples")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(title or "Inter-class diversity: digits generated by each expert", fontsize=10)
    return fig


def plot_gate_sigma(diag: dict, title: str = ""):
    """Left: the experts' shares of wins against sigma; middle: the gate's mean probabilities;
    right: the winner's entropy, the gate's entropy and how often the gate picks the winner."""
    sig = torch.tensor(diag["sigmas"])
    k = diag["num_experts"]
    gate = diag.get("gate")
    fig = _figure(figsize=(13 if gate else 9, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if gate else 2, squeeze=False)[0]
    panels = [("experts' share of wins", diag["winner_share"])] + ([("gate's mean probability", gate["mean_probs"])] if gate else [])
    for ax, (name, values) in zip(axes, panels):
        y = torch.tensor(values).T.numpy()
        ax.stackplot(sig.numpy(), y, colors=[expert_color(e) for e in range(k)], alpha=0.9)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("noise level sigma")
        ax.invert_xaxis()
    ax = axes[-1]
    ax.plot(sig.numpy(), diag["winner_entropy"], "o-", color="black", label="winner entropy")
    if gate:
        ax.plot(sig.numpy(), gate["entropy"], "s--", color="#555555", label="gate entropy (mean)")
        ax.plot(sig.numpy(), gate["accuracy"], "^-", color="#d62728", label="gate picks the winner")
        ax.axhline(1 / k, color="#d62728", lw=0.8, ls=":", label=f"chance 1/{k}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("noise level sigma")
    ax.set_title("entropy (1 = uniform) and gate accuracy", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "MCL: who wins at each noise level, and what the gate says", fontsize=11)
    fig.legend(handles=_expert_handles(k), loc="outside lower center", ncol=min(k, 8), fontsize=8, frameon=False)
    return fig


def plot_winner_digits(diag: dict, title: str = ""):
    """One heatmap per noise level: rows digits, columns experts, cell the share of the digit's
    examples the expert wins."""
    data = torch.tensor(diag["winner_share_by_digit"])  # (S, C, K)
    s, c, k = data.shape
    cols = min(s, 4)
    rows = math.ceil(s / cols)
    fig = _figure(figsize=(2.6 * cols + 1.2, 2.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes.flat[i]
        if i >= s:
            ax.axis("off")
            continue
        im = ax.imshow(data[i].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"sigma {diag['sigmas'][i]:.3g}", fontsize=9)
        ax.set_xticks(range(k))
        ax.set_yticks(range(c))
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("digit")
        if i // cols == rows - 1:
            ax.set_xlabel("expert")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.6, label="share of the digit's examples won")
    fig.suptitle(title or "MCL: the winning expert's share per digit at each noise level", fontsize=11)
    return fig


def plot_quality_vs_nfe(points: list[dict], floor: float | None = None, title: str = ""):
    """``points``: dicts with sampler, nfe, frechet. One line per sampler; the real-data floor dashed."""
    fig = _figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    from matplotlib.ticker import ScalarFormatter

    for i, s in enumerate(dict.fromkeys(p["sampler"] for p in points)):
        pts = sorted((p["nfe"], p["frechet"]) for p in points if p["sampler"] == s)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="osD^v"[i % 5], color=sampler_color(s), label=s, alpha=0.9)
    if floor is not None:
        ax.axhline(floor, color=FLOOR_COLOR, linestyle="--", label="real data (floor)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    if all(p["frechet"] > 0 for p in points) and (floor is None or floor > 0):
        ax.set_yscale("log")
    ax.set_xlabel("function evaluations per sample (NFE)")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_title(title or "Quality against the number of function evaluations")
    ax.legend(frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_guidance(series: dict[str, tuple[list[float], list[float], list[float]]], floor: float | None = None, title: str = ""):
    """Guidance scale against Frechet distance (left axis) and class accuracy (right axis), one
    pair of curves per model: ``series`` maps a model name to (scales, accuracies, frechets)."""
    fig = _figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax2 = ax.twinx()
    c_fd, c_acc = "#0072B2", "#D55E00"
    lines, all_scales = [], set()
    for i, (model, (scales, accuracies, frechets)) in enumerate(series.items()):
        style = ("-", "--", ":")[i % 3]
        lines += ax.plot(scales, frechets, marker="o", linestyle=style, color=c_fd, label=f"{model}: Frechet distance")
        lines += ax2.plot(scales, accuracies, marker="s", linestyle=style, color=c_acc, label=f"{model}: class accuracy")
        all_scales.update(scales)
    span = sorted(all_scales)
    if floor is not None and span:
        lines += ax.plot(span, [floor] * len(span), linestyle="--", color=FLOOR_COLOR, label="Frechet floor (real data)")
    ax.set_xlabel("guidance scale (0: unconditional, 1: conditional)")
    ax.set_ylabel("Frechet distance (classifier features)", color=c_fd)
    ax2.set_ylabel("accuracy (requested digit = classified)", color=c_acc)
    if span:
        lines += ax2.plot(span, [1 / NUM_CLASSES] * len(span), linestyle=":", color=c_acc, alpha=0.5, label="chance accuracy")
    ax2.set_ylim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Classifier-free guidance: accuracy and quality")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", frameon=False, fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig


def make_figures(cfg: EvalConfig, models: Models, records, sweep_records, floors, expert_preds, out_dir: Path, device, log=_log, diagnosis: dict | None = None) -> dict:
    """Write the figures (those whose models are available; the MCL diagnosis's two when
    ``diagnosis`` is given); returns {name: path}."""
    written = {}

    def save(name, fig):
        path = out_dir / FIGURES[name]
        fig.savefig(path, dpi=150)
        written[name] = str(path)

    mcl = models.diffusion.get("mcl")
    K = models.num_experts
    if mcl is not None:
        base = Settings(model="mcl", sampler=cfg.samplers[0], steps=cfg.steps, seed=cfg.seed, n=1)
        routes = expand_routings(cfg.routings, K)
        if models.gate is None:
            routes = [r for r in routes if not routing_needs_gate(r)]
        strips = [trajectory_strip(replace(base, routing=r), mcl, models.gate, device) for r in routes]
        if strips:
            save("trajectories", plot_trajectories(strips, K, f"MCL denoising trajectories, one initial noise (seed {cfg.seed}, {cfg.samplers[0]}, {cfg.steps} steps); frame: expert used (soft: largest weight)"))
        if models.gate is not None:
            sig, exp = routing_usage(replace(base, n=cfg.usage_n, routing="gated"), mcl, models.gate, device)
            s, frac = expert_usage_by_sigma(sig, exp, K)
            save("expert_usage", plot_expert_usage(s, frac, f"Temporal specialisation: gated routing of {cfg.usage_n} samples ({cfg.samplers[0]}, {cfg.steps} steps)"))
        else:
            log("expert-usage figure skipped: no gating checkpoint")
        hists = []
        for k in range(K):
            preds = expert_preds.get(k)
            if preds is None or len(preds) < cfg.diversity_n:
                row = Row(f"mcl expert_{k}", "mcl", replace(base, routing=f"expert:{k}", n=cfg.diversity_n), cfg.batch_size)
                samples = sample_row(row, mcl, models.gate, device)
                preds = metrics.classify(models.classifier.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)["preds"]
            hists.append(metrics.class_histogram(preds[: cfg.diversity_n], NUM_CLASSES))
        save("expert_digits", plot_expert_digits(hists, f"Inter-class diversity: digits generated by each expert ({cfg.diversity_n} images each)"))
        if diagnosis is not None:
            n = diagnosis["n"]
            save("gate_sigma", plot_gate_sigma(diagnosis, f"MCL: who wins at each noise level, and what the gate says ({n} MNIST test images)"))
            save("winner_digits", plot_winner_digits(diagnosis, f"MCL: the winning expert's share per digit at each noise level ({n} MNIST test images)"))
    else:
        log("MCL figures skipped: mcl is not among --models")

    if sweep_records:
        pts = [{"sampler": r["settings"]["sampler"], "nfe": r["nfe"], "frechet": r["metrics"]["frechet"]} for r in sweep_records]
        model = sweep_records[0]["settings"]["model"]
        save("quality_nfe", plot_quality_vs_nfe(pts, floors.get(cfg.sweep_n, {}).get("frechet"), f"Quality against NFE: {model}, {cfg.sweep_n} samples per point"))

    series = {}
    for model in ("cfg", "flow"):
        rows = sorted((r for r in records if r["group"] == model), key=lambda r: r["settings"]["guidance"])
        if rows:
            series[model] = ([r["settings"]["guidance"] for r in rows], [r["metrics"]["accuracy"] for r in rows], [r["metrics"]["frechet"] for r in rows])
            floor = rows[0]["metrics"]["frechet_floor"]
    if series:
        save("guidance", plot_guidance(series, floor, f"Classifier-free guidance ({cfg.samplers[0]}, {cfg.steps} steps, {cfg.n} samples per point)"))
    return written
