"""Multiple Choice Learning at sampling time: K expert denoisers behind a router.

The winner-takes-all losses that train the experts are ``diffusion_core/wta.py``.

Sampling: ``MCLDenoiser`` routes every sample at every step to an expert (or a mixture of them)
with a router, and remembers which expert served each sample (``last_expert``). The routings, by
name (``make_router``; ``ROUTING_HELP`` says in a sentence what each does, ``ROUTING_COST`` what
it costs in expert evaluations per image per step):

* per step, from the noise level or the noisy image: ``expert:K``, ``heuristic``, ``gated``,
  ``soft`` (all K experts), ``sampled`` / ``sampled:T`` (drawn from the gate's probabilities with
  the seed, at temperature T);
* per step, from an estimate of the clean image: ``x0gate`` (the previous step's), ``scout`` (one
  expert's, at most 2 evaluations);
* once per trajectory: ``pooled`` (uniform), ``winrate`` (in proportion to training wins),
  ``sticky`` / ``sticky:SIGMA`` (gated until the noise falls to SIGMA, then kept);
* guidance by the expert's part of the data: ``guided`` / ``guided:W`` (winrate's expert, pushed
  away from the score-weighted mixture of all experts by W, as classifier-free guidance).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoisers import Denoiser, as_sigma_batch
from .nets import HypothesisNet, SharedMCLNet

# ---------------------------------------------------------------------------------------------
# Routers
#
# A router picks, for every sample at every denoiser call, the expert that serves it (or mixture
# weights over all of them). Routers that draw at random never touch the sampler's generator: they
# draw from a private generator derived from its seed (``routing_generator``), so every routing
# sees the same initial and ancestral noise for a seed, and the same seed gives the same routes.
# (``pooled`` predates this and draws its choices from the sampler's generator; kept as it was so
# that its share links still reproduce.)


@dataclass
class Route:
    index: torch.Tensor  # (B,) expert serving each sample (argmax of weights for mixtures)
    weights: torch.Tensor | None = None  # (B, K) mixture weights, or None for a hard choice
    probs: torch.Tensor | None = None  # (B, K) gating probabilities, when a gate was used
    computed: dict[int, torch.Tensor] | None = None  # expert -> its prediction for the whole batch, already paid for


class Router:
    name = "router"
    needs_gate = False

    def reset(self, batch_size: int, num_experts: int, generator: torch.Generator | None = None) -> None:
        pass

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, mcl: MCLDenoiser) -> Route:
        raise NotImplementedError


def routing_generator(generator: torch.Generator | None, salt: str) -> torch.Generator:
    """A CPU generator for a router's own draws, seeded from the sampling generator's seed and the
    router's name; the sampling generator's state is left untouched."""
    seed = 0 if generator is None else generator.initial_seed()
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_experts(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of ``probs`` (B, K) and uniform ``u`` (B,) in [0, 1), the first
    expert whose cumulative probability exceeds ``u``. Rows are normalised first."""
    p = probs.detach().double().cpu()
    cdf = (p / p.sum(dim=1, keepdim=True)).cumsum(dim=1)
    return (u.double().cpu()[:, None] >= cdf).sum(dim=1).clamp(max=p.shape[1] - 1)


def validate_win_rates(win_rates, num_experts: int) -> torch.Tensor:
    """K non-negative finite numbers with a positive sum -> probabilities (K,) float64."""
    try:
        r = torch.as_tensor([float(v) for v in win_rates], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"win rates must be a list of {num_experts} numbers, got {win_rates!r}") from None
    if r.numel() != num_experts:
        raise ValueError(f"win rates have {r.numel()} entries, the ensemble has {num_experts} experts")
    if not torch.isfinite(r).all() or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"win rates must be finite, non-negative and not all zero, got {r.tolist()}")
    return r / r.sum()


class ExpertRouter(Router):
    """Always expert ``k``."""

    def __init__(self, k: int):
        self.k = int(k)
        self.name = f"expert:{self.k}"

    def __call__(self, x, sigma, mcl):
        return Route(torch.full((x.shape[0],), self.k, dtype=torch.long, device=x.device))


def noise_bands(sigma: torch.Tensor, num_experts: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Default heuristic: K equal bands of log-sigma over [sigma_min, sigma_max]; expert 0 serves
    the noisiest band, expert K-1 the cleanest."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    pos = (hi - sigma.double().clamp_min(1e-12).log()) / (hi - lo)  # 0 at sigma_max, 1 at sigma_min
    return (pos * num_experts).floor().long().clamp(0, num_experts - 1)


class HeuristicRouter(Router):
    """A fixed rule from the noise level (and K) to an expert; ``rule(sigma, K, sigma_min, sigma_max)``."""

    name = "heuristic"

    def __init__(self, rule: Callable[..., torch.Tensor] = noise_bands):
        self.rule = rule

    def __call__(self, x, sigma, mcl):
        return Route(self.rule(sigma, mcl.num_experts, mcl.sigma_min, mcl.sigma_max).to(x.device))


class GatedRouter(Router):
    """Argmax of the gating network, per sample and step."""

    name = "gated"
    needs_gate = True

    def __call__(self, x, sigma, mcl):
        probs = mcl.gate_probs(x, sigma)
        return Route(probs.argmax(dim=1), probs=probs)


class SoftRouter(Router):
    """Mixture of all experts' predictions weighted by the gating probabilities."""

    name = "soft"
    needs_gate = True

    def __call__(self, x, sigma, mcl):
        probs = mcl.gate_probs(x, sigma)
        return Route(probs.argmax(dim=1), weights=probs, probs=probs)


class SampledRouter(Router):
    """An expert drawn from the gating probabilities, per sample and step, with the seed's routing
    generator (``routing_generator``): the gate's uncertainty is kept instead of its argmax.

    ``temperature`` T draws from the probabilities raised to 1/T and renormalised: T < 1 sharpens
    them towards the argmax (``gated``), T > 1 flattens them towards a uniform draw per step."""

    name = "sampled"
    needs_gate = True

    def __init__(self, temperature: float = 1.0):
        self.generator: torch.Generator | None = None
        self.temperature = float(temperature)
        if self.temperature != 1.0:
            self.name = f"sampled:{self.temperature:g}"

    def reset(self, batch_size, num_experts, generator=None):
        self.generator = routing_generator(generator, "sampled")  # every temperature draws the same uniforms

    def __call__(self, x, sigma, mcl):
        if self.generator is None:
            raise RuntimeError("sampled routing needs reset(batch_size, K, generator) before sampling")
        probs = mcl.gate_probs(x, sigma)
        u = torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64)
        draw = probs if self.temperature == 1.0 else torch.softmax(probs.double().clamp_min(1e-300).log() / self.temperature, dim=1)
        return Route(draw_experts(draw, u).to(x.device), probs=probs)


class _OncePerTrajectory(Router):
    """One expert per sample, chosen at ``reset`` and kept for the whole trajectory; a batch that is
    a multiple of the reset size (CFG's doubled batch) repeats the choice."""

    def __init__(self):
        self.choice: torch.Tensor | None = None

    def __call__(self, x, sigma, mcl):
        if self.choice is None:
            raise RuntimeError(f"{self.name} routing needs reset(batch_size, ...) before sampling")
        b = x.shape[0]
        if b % len(self.choice):
            raise RuntimeError(f"{self.name} routing was reset for {len(self.choice)} samples, got a batch of {b}")
        return Route(self.choice.repeat(b // len(self.choice)).to(x.device))


class PooledRouter(_OncePerTrajectory):
    """Each sample gets one random expert (from the sampling seed) for its whole trajectory."""

    name = "pooled"

    def reset(self, batch_size, num_experts, generator=None):
        self.choice = torch.randint(0, num_experts, (batch_size,), generator=generator, device="cpu")


class WinRateRouter(_OncePerTrajectory):
    """Each sample gets one expert for its whole trajectory, drawn with probability equal to the
    expert's share of training wins (the MCL prior p(k)); uniform when no rates are known."""

    name = "winrate"

    def __init__(self, win_rates=None):
        super().__init__()
        self.win_rates = None if win_rates is None else [float(v) for v in win_rates]

    def rates(self, num_experts: int) -> torch.Tensor:
        if self.win_rates is None:
            return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
        return validate_win_rates(self.win_rates, num_experts)

    def reset(self, batch_size, num_experts, generator=None):
        p = self.rates(num_experts)
        # salted "winrate" for guided too, so guided:1 draws winrate's experts and gives its images
        u = torch.rand(batch_size, generator=routing_generator(generator, "winrate"), dtype=torch.float64)
        self.choice = draw_experts(p.expand(batch_size, -1), u)


class PartGuidedRouter(WinRateRouter):
    """Classifier-free guidance with each expert's part of the data as the label (Bao et al. 2022;
    Hu et al., CVPR 2023, "Self-Guided Diffusion Models"): each sample keeps one expert k for its
    whole trajectory, drawn as ``winrate`` draws it, and is served ``D_mix + w (D_k - D_mix)``,
    where ``D_mix``, the score-weighted mixture of every expert (``soft``), is the posterior mean
    of the whole data and ``D_k`` that of part k. ``w = 1`` is ``winrate``; ``w > 1`` pushes each
    image further into its part, as CFG's scale does for a digit. On one shared trunk this costs
    one pass; on separate experts, all K."""

    name = "guided"
    needs_gate = True

    def __init__(self, scale: float = 1.5, win_rates=None):
        super().__init__(win_rates)
        self.scale = float(scale)

    def __call__(self, x, sigma, mcl):
        choice = super().__call__(x, sigma, mcl).index
        probs = mcl.gate_probs(x, sigma)
        onehot = torch.nn.functional.one_hot(choice.to(probs.device), probs.shape[1]).to(probs.dtype)
        weights = (1.0 - self.scale) * probs + self.scale * onehot
        return Route(choice, weights=weights, probs=probs)


class EstimateGatedRouter(Router):
    """The gate looks at an estimate of the clean image instead of the noisy one.

    ``x0gate`` (``scout=False``): the estimate is the previous denoiser call's output (free); the
    first call of a trajectory, which has none, is served by the scout expert. ``scout``
    (``scout=True``): the scout expert predicts the clean image at this step, the gate picks an
    expert from that prediction, and the pick predicts again unless it is the scout (at most two
    expert evaluations per sample and step).

    The scout is the expert with the highest training win rate (expert 0 without rates). The shipped
    gate was trained on noisy images, so it is shown the estimate as an almost clean image, at the
    ensemble's ``sigma_min``; a gate trained on (noisy image, estimate, sigma) says so with an
    attribute ``takes_estimate = True`` and is called as ``gate(x, sigma, estimate)``."""

    needs_gate = True

    def __init__(self, scout: bool = False, win_rates=None):
        self.scout = bool(scout)
        self.name = "scout" if self.scout else "x0gate"
        self.win_rates = None if win_rates is None else [float(v) for v in win_rates]

    def scout_expert(self, num_experts: int) -> int:
        if self.win_rates is None:
            return 0
        return int(validate_win_rates(self.win_rates, num_experts).argmax())

    def __call__(self, x, sigma, mcl):
        b = x.shape[0]
        s = self.scout_expert(mcl.num_experts)
        if self.scout:
            estimate = mcl.experts[s](x, sigma, mcl.current_label)
            probs = mcl.gate_probs_on_estimate(x, sigma, estimate)
            return Route(probs.argmax(dim=1), probs=probs, computed={s: estimate})
        prev = mcl.last_denoised
        if prev is None or prev.shape != x.shape:  # the first call of a trajectory
            return Route(torch.full((b,), s, dtype=torch.long, device=x.device))
        probs = mcl.gate_probs_on_estimate(x, sigma, prev)
        return Route(probs.argmax(dim=1), probs=probs)


class StickyRouter(Router):
    """Another router (the gate's argmax by default) until the noise level falls to ``lock_sigma``;
    each sample keeps the expert chosen at that call for the rest of its trajectory."""

    def __init__(self, lock_sigma: float = 1.0, inner: Router | None = None):
        self.lock_sigma = float(lock_sigma)
        self.inner = inner if inner is not None else GatedRouter()
        self.needs_gate = self.inner.needs_gate
        self.name = "sticky" if self.lock_sigma == STICKY_SIGMA else f"sticky:{self.lock_sigma:g}"
        self.locked: torch.Tensor | None = None

    def reset(self, batch_size, num_experts, generator=None):
        self.locked = None
        self.inner.reset(batch_size, num_experts, generator)

    def __call__(self, x, sigma, mcl):
        if self.locked is not None:
            if len(self.locked) != x.shape[0]:
                raise RuntimeError(f"sticky routing locked {len(self.locked)} samples, got a batch of {x.shape[0]}; call reset() between trajectories")
            return Route(self.locked.to(x.device))
        route = self.inner(x, sigma, mcl)
        if float(sigma.max()) <= self.lock_sigma:
            self.locked = route.index.detach().clone()
        return route


GUIDED_SCALE = 1.5  # guided's default weight (guided:W for another)
STICKY_SIGMA = 1.0  # sticky's default lock level: the digit is mostly decided by sigma = 1 (x0 and noise of equal scale)

ROUTINGS = ("expert:K", "heuristic", "gated", "soft", "pooled", "sampled", "winrate", "guided", "x0gate", "scout", "sticky")

ROUTING_HELP = {
    "expert:K": "One expert, the same for every image and step; each expert draws mostly the few digits it won in training.",
    "heuristic": "A fixed rule on the noise level: the noise range is cut into K equal bands, expert 0 serves the noisiest, the last expert the cleanest.",
    "gated": "The gating network looks at the noisy image and picks its most likely best expert, at every step.",
    "soft": "Every expert predicts at every step and the predictions are averaged with the gating network's probabilities as weights (K times the cost).",
    "pooled": "Each image gets one expert, drawn uniformly from the seed, for its whole trajectory.",
    "sampled": "Like gated, but the expert is drawn from the gating network's probabilities (with the seed); sampled:T draws at temperature T "
               "(below 1 sharper, above 1 flatter).",
    "winrate": "Each image gets one expert for its whole trajectory, drawn in proportion to how often that expert won in training.",
    "guided": "Like winrate, and each image is pushed from the average of all experts towards its own expert's part of the data, as CFG does for a digit (guided:W, 1.5 by default).",
    "x0gate": "The gating network looks at the previous step's guess of the clean image rather than at the noise; the first step is served by the expert that won most in training.",
    "scout": "The expert that won most in training guesses the clean image; the gating network picks an expert from that guess, which then predicts (up to 2 experts a step).",
    "sticky": "Like gated until the noise level falls to 1 (sticky:S for another level); from then on each image keeps the expert it had.",
}

ROUTING_COST = {"expert:K": "1", "heuristic": "1", "gated": "1", "soft": "K", "pooled": "1", "sampled": "1",
                "winrate": "1", "guided": "K", "x0gate": "1", "scout": "1 or 2", "sticky": "1"}
"""Expert evaluations per image per step, for display (``routing_cost`` gives the number)."""


def _base(spec: str) -> str:
    spec = str(spec).strip().lower()
    return spec.split(":", 1)[0] + ":K" if spec.startswith("expert:") else spec.split(":", 1)[0]


def routing_cost(spec: str, num_experts: int, shared: bool = False) -> int:
    """The most expert evaluations one image costs per denoiser call with this routing (the gating
    network, about 6% of one expert's parameters, not counted). With hypotheses on one trunk
    (``shared``), one pass gives all of them: every routing costs one, ``scout`` two."""
    make_router(spec, num_experts)
    base = _base(spec)
    if shared:
        return 2 if base == "scout" else 1
    return num_experts if base in ("soft", "guided") else 2 if base == "scout" else 1


def routing_needs_gate(spec: str) -> bool:
    """Whether this routing uses the gating network (raises on a misspelt routing)."""
    return make_router(spec, None).needs_gate


def _spec_number(spec: str, default: float, ok: Callable[[float], bool], expected: str) -> float:
    """The number after ``name:`` in a routing spec (``default`` without one); ``ValueError`` naming
    ``expected`` when it is not a finite number that ``ok`` accepts."""
    text = spec.split(":", 1)[1] if ":" in spec else str(default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"bad routing {spec!r}: expected {expected}")
    return value


def make_router(spec: str, num_experts: int | None, win_rates=None) -> Router:
    """A router from its name: ``expert:K``, ``heuristic``, ``gated``, ``soft``, ``pooled``,
    ``sampled`` / ``sampled:T``, ``winrate``, ``guided`` / ``guided:W``, ``x0gate``, ``scout`` or ``sticky`` / ``sticky:SIGMA`` (see
    ``ROUTING_HELP``). ``num_experts=None`` checks the spelling only (any K >= 0 is accepted).
    ``win_rates``: the experts' shares of training wins (``winrate``; the scout of ``x0gate`` and
    ``scout``); ``None`` means uniform."""
    spec = str(spec).strip().lower()
    if win_rates is not None and num_experts is not None:
        validate_win_rates(win_rates, num_experts)
    if spec.startswith("expert:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad routing {spec!r}: expected expert:K with K an integer") from None
        if k < 0 or (num_experts is not None and k >= num_experts):
            bound = "be at least 0" if num_experts is None else f"be in 0..{num_experts - 1}"
            raise ValueError(f"bad routing {spec!r}: expert index must {bound}")
        return ExpertRouter(k)
    if spec == "guided" or spec.startswith("guided:"):
        scale = _spec_number(spec, GUIDED_SCALE, lambda w: 0 <= w <= 10, "guided:W with W a weight from 0 to 10, e.g. guided:1.5")
        return PartGuidedRouter(scale, win_rates)
    if spec.startswith("sampled:"):
        return SampledRouter(_spec_number(spec, 1.0, lambda t: 0 < t <= 100, "sampled:T with T a temperature above 0 and at most 100, e.g. sampled:2"))
    if spec == "sticky" or spec.startswith("sticky:"):
        return StickyRouter(_spec_number(spec, STICKY_SIGMA, lambda s: s > 0, "sticky:SIGMA with SIGMA a positive noise level, e.g. sticky:1"))
    routers = {
        "heuristic": HeuristicRouter, "gated": GatedRouter, "soft": SoftRouter, "pooled": PooledRouter, "sampled": SampledRouter,
        "winrate": lambda: WinRateRouter(win_rates), "x0gate": lambda: EstimateGatedRouter(False, win_rates),
        "scout": lambda: EstimateGatedRouter(True, win_rates),
    }
    if spec not in routers:
        experts = "expert:K" if num_experts is None else f"expert:0..expert:{num_experts - 1}"
        raise ValueError(f"unknown routing {spec!r}; expected one of {experts}, {', '.join(r for r in ROUTINGS if r != 'expert:K')}")
    return routers[spec]()


class MCLDenoiser(Denoiser):
    """K expert denoisers behind a router. Only the experts a step needs are evaluated, each on
    its own samples; soft routing evaluates all and mixes their predictions.

    After each call: ``last_expert`` (B,), ``last_gate_probs`` (B, K) or None, ``last_denoised``
    (the output, which ``x0gate`` reads on the next call) and ``last_evals`` (expert evaluations,
    counted per sample); ``expert_evals`` sums them since ``reset``.

    ``watch_gate = True`` (the app sets it) asks the gating network for its probabilities on
    every call even when the router does not use them, so a routing such as ``winrate`` can show
    what the gate thinks along the trajectory; ``last_gate_routed`` says whether the probabilities
    of the last call chose the expert. The gate costs about 6% of one expert and draws no random
    numbers, so the images are the same either way."""

    def __init__(self, experts: list[Denoiser], router: Router, gate: torch.nn.Module | None = None):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.router = router
        self.gate = gate
        first = experts[0]
        self.sigma_min = first.sigma_min
        self.sigma_max = first.sigma_max
        self.discrete_sigmas = getattr(first, "discrete_sigmas", None)
        self.current_label: torch.Tensor | None = None
        self.watch_gate = False
        self._clear()

    def _clear(self):
        self.last_expert = self.last_gate_probs = self.last_denoised = None
        self.last_gate_routed = False
        self.last_evals = self.expert_evals = 0

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def _need_gate(self):
        if self.gate is None:
            raise ValueError(f"routing {self.router.name!r} needs a gating network, and none is loaded")

    def gate_probs(self, x, sigma) -> torch.Tensor:
        self._need_gate()
        return torch.softmax(self.gate(x, sigma).float(), dim=1)

    def gate_probs_on_estimate(self, x, sigma, estimate) -> torch.Tensor:
        """The gate's probabilities given an estimate of the clean image (see ``EstimateGatedRouter``)."""
        self._need_gate()
        if getattr(self.gate, "takes_estimate", False):
            return torch.softmax(self.gate(x, sigma, estimate).float(), dim=1)
        low = torch.full_like(as_sigma_batch(sigma, x), float(self.sigma_min))
        return torch.softmax(self.gate(estimate, low).float(), dim=1)

    def reset(self, batch_size, generator=None):
        self.router.reset(batch_size, self.num_experts, generator)
        self._clear()

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        self.current_label = label
        route = self.router(x, sigma, self)
        computed = route.computed or {}
        evals = sum(len(v) for v in computed.values())
        if route.weights is not None:
            out = sum(route.weights[:, k, None, None, None].to(x.dtype) * expert(x, sigma, label) for k, expert in enumerate(self.experts))
            evals += x.shape[0] * self.num_experts
        else:
            out = torch.empty_like(x)
            for k in route.index.unique().tolist():
                m = route.index == k
                if k in computed:
                    out[m] = computed[k][m]
                else:
                    out[m] = self.experts[k](x[m], sigma[m], None if label is None else label[m])
                    evals += int(m.sum())
        probs = route.probs
        if probs is None and self.watch_gate and self.gate is not None:
            probs = self.gate_probs(x, sigma)  # shown, not used
        return self._remember(route, probs, out, evals)

    def _remember(self, route: Route, probs, out: torch.Tensor, evals: int) -> torch.Tensor:
        """Keep what the call did (``last_*``, ``expert_evals``); returns ``out``."""
        self.last_gate_routed = route.probs is not None
        self.last_expert = route.index.detach().cpu()
        self.last_gate_probs = None if probs is None else probs.detach().cpu()
        self.last_denoised = out.detach()
        self.last_evals = evals
        self.expert_evals += evals
        return out


def hypothesis_denoisers(net: SharedMCLNet, objective) -> list[Denoiser]:
    """Each hypothesis of a ``SharedMCLNet`` alone, as a denoiser (the trunk and its head)."""
    return [objective.denoiser(HypothesisNet(net, k)) for k in range(net.num_experts)]


class ScoreGate(torch.nn.Module):
    """The score head of a ``SharedMCLNet`` as a gating network ``gate(x, sigma) -> logits (B, K)``,
    for callers that hold a gate beside the model (the registry, the pipeline's checks)."""

    def __init__(self, net: SharedMCLNet, objective):
        super().__init__()
        self.net = net
        self.base = objective.denoiser(net)  # its net_inputs only

    def forward(self, x, sigma):
        sigma = as_sigma_batch(sigma, x)
        return self.net(*self.base.net_inputs(x, sigma))[1]


class SharedMCLDenoiser(MCLDenoiser):
    """The K hypotheses of one ``SharedMCLNet`` behind a router, with its score head as the gate.

    One trunk pass per call gives every hypothesis and the scores (``hypotheses``), so every
    routing, ``soft`` included, costs one pass; ``scout`` and ``x0gate`` read the score head on an
    estimate, which is a second pass. The score head's probabilities are shown at every call
    (``last_gate_probs``), whichever routing chose. ``experts[k]`` is hypothesis k alone, as a
    denoiser."""

    shared = True
    records_mixture = True  # last_mixture: the score-weighted mixture of the last call's hypotheses (autoguidance of="mixture")

    def __init__(self, net: SharedMCLNet, objective, router: Router):
        super().__init__(hypothesis_denoisers(net, objective), router, gate=ScoreGate(net, objective))
        self.net = net
        self.base = objective.denoiser(net)  # its net_inputs and from_output
        self._pass = None
        self._last_hypotheses = None  # (preds, probs) of the last call, for last_mixture

    def hypotheses(self, x, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(every hypothesis's estimate of the clean image (B, K, C, H, W), the score head's
        probabilities (B, K)), from one pass."""
        sigma = as_sigma_batch(sigma, x)
        outs, logits = self.net(*self.base.net_inputs(x, sigma))
        preds = torch.stack([self.base.from_output(x, sigma, outs[:, k]) for k in range(outs.shape[1])], dim=1)
        return preds, torch.softmax(logits.float(), dim=1)

    @property
    def last_mixture(self) -> torch.Tensor:
        """``D_mix``, the score-weighted mean of the last call's hypotheses (computed when asked for)."""
        preds, probs = self._last_hypotheses
        return (probs[:, :, None, None, None].to(preds.dtype) * preds).sum(dim=1)

    def gate_probs(self, x, sigma):
        if self._pass is not None and self._pass[0] is x:
            return self._pass[2]
        return self.hypotheses(x, sigma)[1]

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        self.current_label = label
        preds, probs = self.hypotheses(x, sigma)
        self._pass = (x, preds, probs)
        try:
            route = self.router(x, sigma, self)
        finally:
            self._pass = None
        b = x.shape[0]
        if route.weights is not None:
            out = (route.weights[:, :, None, None, None].to(x.dtype) * preds).sum(dim=1)
        else:
            out = preds[torch.arange(b, device=x.device), route.index.to(x.device)]
        self._last_hypotheses = (preds, probs)
        return self._remember(route, probs, out, b + sum(len(v) for v in (route.computed or {}).values()))
