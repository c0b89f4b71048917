"""MCL analyses: which expert serves each noise level, trajectory strips, and the diagnosis of
who wins where and what the gate thinks."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..models import LoadedModel
from ..pipeline import Settings, trajectory
from .config import NUM_CLASSES, routing_label

# MCL analyses


def expert_usage_by_sigma(sigmas, experts: torch.Tensor, num_experts: int, bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of samples routed to each expert at each noise level.

    ``sigmas`` (S,): the level of each step; ``experts`` (S, N): the expert of each sample there.
    Without ``bins``, steps at the same sigma are pooled and each distinct sigma is one point;
    with ``bins``, steps are pooled into ``bins`` equal bins of log(sigma) (empty bins dropped).
    Returns ``(sigma, fractions)``: sigma (P,) decreasing (bin centres in log space), fractions
    (P, K) whose rows sum to 1.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(experts).long()
    if e.dim() != 2 or e.shape[0] != s.shape[0]:
        raise ValueError(f"experts must have shape (steps, N) with steps = len(sigmas) = {s.shape[0]}, got {tuple(e.shape)}")
    if (s <= 0).any():
        raise ValueError("sigmas must be positive")
    if bins is None:
        centres, group = torch.unique(s, return_inverse=True)
    else:
        ls = s.log()
        lo, hi = float(ls.min()), float(ls.max())
        width = (hi - lo) / bins if hi > lo else 1.0
        group = ((ls - lo) / width).floor().long().clamp(0, bins - 1)
        centres = torch.exp(lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * width)
    counts = torch.zeros(len(centres), num_experts, dtype=torch.float64)
    for i in range(len(s)):
        counts[group[i]] += torch.bincount(e[i], minlength=num_experts).double()
    keep = counts.sum(1) > 0
    centres, counts = centres[keep], counts[keep]
    order = torch.argsort(centres, descending=True)
    centres, counts = centres[order], counts[order]
    return centres, counts / counts.sum(1, keepdim=True)


def routing_usage(settings: Settings, model: LoadedModel, gate=None, device="cpu") -> tuple[list[float], torch.Tensor]:
    """Run one trajectory; the sigma of each step and the expert of each sample there (S, N)."""
    sig, exp = [], []
    for step in trajectory(settings, model, gate, device):
        sig.append(step.sigma)
        exp.append(step.expert)
    return sig, torch.stack(exp)


@dataclass
class TrajectoryStrip:
    label: str
    steps: list[int]  # step indices shown
    sigmas: list[float]  # noise level at which each shown prediction was made
    images: torch.Tensor  # (C, 28, 28) uint8: the denoiser's prediction of the clean image
    experts: list[int | None]  # expert that made each shown prediction (argmax for soft)
    final: torch.Tensor  # (28, 28) uint8 sample


def column_steps(steps: int, columns: int) -> list[int]:
    """``columns`` step indices spread evenly over 0..steps-1, first and last included."""
    if steps <= columns:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (columns - 1)) for i in range(columns)})


def trajectory_strip(settings: Settings, model: LoadedModel, gate=None, device="cpu", columns: int = 8, label: str | None = None) -> TrajectoryStrip:
    """The predicted clean image at ``columns`` steps of one sample (``settings.n`` is set to 1)."""
    settings = replace(settings, n=1)
    show = set(column_steps(settings.steps, columns))
    idx, sig, imgs, exps, last = [], [], [], [], None
    for step in trajectory(settings, model, gate, device):
        last = step
        if step.index in show:
            idx.append(step.index)
            sig.append(step.sigma)
            imgs.append(step.denoised[0].detach().float().cpu().clamp(-1, 1))
            exps.append(None if step.expert is None else int(step.expert[0]))
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)[0]  # noqa: E731
    return TrajectoryStrip(
        label or routing_label(settings.routing),
        idx,
        sig,
        torch.stack([to_u8(t) for t in imgs]),
        exps,
        to_u8(last.x[0].detach().float().cpu().clamp(-1, 1)),
    )


# MCL diagnosis: who wins where, and what the gate thinks
#
# Real test images x0 are noised at S fixed levels (x = x0 + sigma * noise, the same noise for
# every expert); each expert's loss is its squared error on x0 (for an epsilon-network it is the
# training loss times sigma^2, so the winner is the same). From the (S, N, K) losses: the winner
# of each example at each level, the experts' shares of wins per level, the winner's entropy per
# level, the shares per digit; and the gate, shown the same noisy images: its mean probabilities,
# their entropy and how often its argmax is the winner.


def diagnosis_levels(sigma_min: float, sigma_max: float, levels: int) -> torch.Tensor:
    """``levels`` noise levels spaced geometrically from ``sigma_max`` down to ``sigma_min`` (float64)."""
    if levels < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need at least one level and 0 < sigma_min <= sigma_max, got {levels}, {sigma_min}, {sigma_max}")
    if levels == 1:
        return torch.tensor([math.sqrt(sigma_min * sigma_max)], dtype=torch.float64)
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), levels, dtype=torch.float64)


@torch.no_grad()
def expert_losses(experts, x0: torch.Tensor, sigmas, generator: torch.Generator | None = None, batch_size: int = 500, gate=None):
    """Squared error on x0 (per example, mean over pixels) of each expert at each level: (S, N, K);
    with ``gate`` also its probabilities on the same noisy images (S, N, K), else None."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    s_n, n, k = len(sigmas), len(x0), len(experts)
    losses = torch.empty(s_n, n, k, dtype=torch.float64)
    probs = None if gate is None else torch.empty(s_n, n, k, dtype=torch.float64)
    device = next((p.device for e in experts for p in e.parameters()), torch.device("cpu"))
    for i, sigma in enumerate(sigmas.tolist()):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        for a in range(0, n, batch_size):
            clean = x0[a:a + batch_size].to(device)
            x = clean + sigma * noise[a:a + batch_size].to(device)
            s = torch.full((len(x),), sigma, device=device)
            for j, expert in enumerate(experts):
                losses[i, a:a + len(x), j] = (expert(x, s) - clean).float().pow(2).flatten(1).mean(dim=1).double().cpu()
            if gate is not None:
                probs[i, a:a + len(x)] = torch.softmax(gate(x, s).float(), dim=1).double().cpu()
    return losses, probs


def winner_shares(winners: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of the examples each expert wins at each level: winners (S, N) -> (S, K)."""
    w = torch.as_tensor(winners).long()
    return torch.stack([torch.bincount(row, minlength=num_experts).double() / max(len(row), 1) for row in w])


def normalized_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a distribution (.., K) divided by log K: 1 uniform, 0 one expert."""
    p = torch.as_tensor(p, dtype=torch.float64)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    k = p.shape[-1]
    h = -(p * p.clamp_min(1e-300).log()).sum(dim=-1)
    return (h / math.log(k)).clamp(0, 1) if k > 1 else torch.zeros_like(h)


def winner_share_by_digit(winners: torch.Tensor, labels: torch.Tensor, num_experts: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(S, C, K): at each level, the share of digit c's examples that expert k wins (a digit with no
    examples has a row of zeros)."""
    w = torch.as_tensor(winners).long()
    y = torch.as_tensor(labels).long()
    out = torch.zeros(w.shape[0], num_classes, num_experts, dtype=torch.float64)
    out.index_put_((torch.arange(w.shape[0])[:, None].expand_as(w), y.expand_as(w), w), torch.ones(w.shape, dtype=torch.float64), accumulate=True)
    return out / out.sum(dim=2, keepdim=True).clamp_min(1)


def gate_summary(probs: torch.Tensor, winners: torch.Tensor) -> dict:
    """The gate's mean probabilities (S, K), the mean normalized entropy of its per-example
    probabilities (S,), the share of examples whose argmax is the winner (S,), its cross-entropy
    against the winner in nats (S,), and the baselines to read those against (S,): ``majority``,
    the accuracy of naming the level's most frequent winner for every image, and
    ``majority_ce``, the cross-entropy of giving every image the level's shares of wins (the best
    a gate that sees only sigma can reach; chance, 1/K and log K, is their floor)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    w = torch.as_tensor(winners).long()
    shares = winner_shares(w, p.shape[2])
    ce = -p.gather(2, w[..., None]).squeeze(2).clamp_min(1e-12).log().mean(dim=1)
    base_ce = -(shares * shares.clamp_min(1e-12).log()).sum(dim=1)
    return {"mean_probs": p.mean(dim=1), "entropy": normalized_entropy(p).mean(dim=1),
            "accuracy": (p.argmax(dim=2) == w).double().mean(dim=1), "cross_entropy": ce,
            "majority": shares.max(dim=1).values, "majority_ce": base_ce}


def mcl_diagnosis(model: LoadedModel, x0: torch.Tensor, labels: torch.Tensor, levels: int = 8, gate=None, seed: int = 0, batch_size: int = 500) -> dict:
    """Winners and gate on ``x0`` (N, 1, 28, 28) in [-1, 1] with digit ``labels``, at ``levels``
    noise levels over the experts' range; JSON-ready lists (see ``specialisation_summary``)."""
    experts = model.expert_denoisers()
    sigmas = diagnosis_levels(experts[0].sigma_min, experts[0].sigma_max, levels)
    g = torch.Generator().manual_seed(seed)
    losses, probs = expert_losses(experts, x0, sigmas, g, batch_size, gate)
    winners = losses.argmin(dim=2)
    shares = winner_shares(winners, model.num_experts)
    d = {"n": len(x0), "sigmas": sigmas.tolist(), "num_experts": model.num_experts,
         "winner_share": shares.tolist(), "winner_entropy": normalized_entropy(shares).tolist(),
         "winner_share_overall": winner_shares(winners.reshape(1, -1), model.num_experts)[0].tolist(),
         "winner_share_by_digit": winner_share_by_digit(winners, labels, model.num_experts).tolist(),
         "digit_counts": torch.bincount(torch.as_tensor(labels).long(), minlength=NUM_CLASSES).tolist(),
         "gate": None}
    if probs is not None:
        d["gate"] = {k: v.tolist() for k, v in gate_summary(probs, winners).items()}
    training = model.config.get("training") or {}
    if training.get("wta_scope") == "example":
        # trained with one winner per clean image: its owner, by the training rule (the sum over levels of
        # each hypothesis's loss relative to the mean of the K), is what the score head learnt to predict
        rel = losses / losses.mean(dim=2, keepdim=True).clamp_min(1e-300)
        owners = rel.sum(dim=0).argmin(dim=1)
        d["owner_share"] = winner_shares(owners[None], model.num_experts)[0].tolist()
        d["owner_share_by_digit"] = winner_share_by_digit(owners[None], labels, model.num_experts)[0].tolist()
        if probs is not None:
            d["score_vs_owner"] = {k: v.tolist() for k, v in gate_summary(probs, owners[None].expand_as(winners)).items()}
    return d


def specialisation_summary(diag: dict, top: int = 2) -> list[str]:
    """One sentence per expert (where in the noise range and on which digits it wins) and one on
    the gate, from ``mcl_diagnosis``'s numbers."""
    sig = diag["sigmas"]
    share = torch.tensor(diag["winner_share"])
    by_digit = torch.tensor(diag["winner_share_by_digit"]).mean(dim=0)  # (C, K), averaged over levels
    k = diag["num_experts"]
    lines = []
    for e in range(k):
        lvl = int(share[:, e].argmax())
        digits = by_digit[:, e].argsort(descending=True)[:top].tolist()
        lines.append(f"expert {e}: wins {diag['winner_share_overall'][e]:.0%} of (example, level) pairs; most at sigma {sig[lvl]:.3g} "
                     f"({share[lvl, e]:.0%}); its digits: " + ", ".join(f"{d} ({by_digit[d, e]:.0%} of them)" for d in digits))
    h = diag["winner_entropy"]
    lines.append(f"winner entropy (1 = every expert wins equally): {min(h):.2f} to {max(h):.2f} over sigma {sig[-1]:.3g}..{sig[0]:.3g}")
    g = diag.get("gate")
    if g:
        acc = g["accuracy"]
        top_noisy = int(torch.tensor(g["mean_probs"][0]).argmax())
        lines.append(f"gate: picks the winner for {sum(acc) / len(acc):.0%} of examples on average (chance {1 / k:.0%}), "
                     f"{acc[0]:.0%} at the noisiest level and {acc[-1]:.0%} at the cleanest"
                     + (f" (naming each level's most frequent winner: {g['majority'][0]:.0%} and {g['majority'][-1]:.0%})" if "majority" in g else "")
                     + f"; at sigma {sig[0]:.3g} it gives expert "
                     f"{top_noisy} {g['mean_probs'][0][top_noisy]:.0%} on average (entropy {g['entropy'][0]:.2f})")
    return lines


def diagnosis_markdown(diag: dict) -> str:
    k = diag["num_experts"]
    head = "| sigma | " + " | ".join(f"wins e{e}" for e in range(k)) + " | winner entropy |"
    gate = diag.get("gate")
    if gate:
        head += " " + " | ".join(f"gate p(e{e})" for e in range(k)) + " | gate entropy | gate picks winner | most frequent winner's share |"
    rows = [head, "|" + "---:|" * (head.count("|") - 1)]
    for i, s in enumerate(diag["sigmas"]):
        r = f"| {s:.3g} | " + " | ".join(f"{v:.2f}" for v in diag["winner_share"][i]) + f" | {diag['winner_entropy'][i]:.2f} |"
        if gate:
            r += " " + " | ".join(f"{v:.2f}" for v in gate["mean_probs"][i]) + f" | {gate['entropy'][i]:.2f} | {gate['accuracy'][i]:.2f} |"
            if "majority" in gate:  # results.json files from before the baseline lack it
                r += f" {gate['majority'][i]:.2f} |"
        rows.append(r)
    parts = [f"MCL diagnosis: {diag['n']} MNIST test images noised at {len(diag['sigmas'])} levels; "
             "the winner of an example is the expert with the smallest error on the clean image.", "", *rows, "",
             *[f"* {line}" for line in specialisation_summary(diag)]]
    for key, what in (("gate", "its winner at that level"), ("score_vs_owner", "its owner (the hypothesis it trained through: lowest summed relative loss over the levels)")):
        g = diag.get(key)
        if not g or "cross_entropy" not in g:
            continue
        parts += ["", f"Score head (or gate) against {what}, per noise level, beside the best a predictor that sees only the noise level can do:", "",
                  "| sigma | accuracy | noise-level-only accuracy | cross-entropy (nats) | noise-level-only cross-entropy |", "|---:|---:|---:|---:|---:|"]
        parts += [f"| {sig:.3g} | {g['accuracy'][i]:.3f} | {g['majority'][i]:.3f} | {g['cross_entropy'][i]:.3f} | {g['majority_ce'][i]:.3f} |"
                  for i, sig in enumerate(diag["sigmas"])]
    return "\n".join(parts)
