"""Networks for 1x28x28 images: a time-conditioned UNet, a gating network and a digit classifier.

Every network is built from a plain ``dict`` config so that it can be stored in a checkpoint's
metadata and rebuilt without unpickling anything (see ``diffusion_core.checkpoints``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (possibly fractional) noise-level input ``t`` of shape (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding applied as FiLM (scale and shift)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class _Config:
    """dict round trip for the network configs stored in checkpoint metadata."""

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def of(cls, config=None, **kwargs):
        """A network's config argument as a config: given, from a dict, or built from keyword arguments."""
        if config is None:
            return cls(**kwargs)
        return cls.from_dict(config) if isinstance(config, dict) else config


@dataclass
class UNetConfig(_Config):
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    blocks_per_level: int = 2
    attention: bool = True  # self-attention at the lowest (7x7) resolution
    num_classes: int | None = None  # class-conditional when set; label == num_classes is the "null" class
    dropout: float = 0.0



class UNet(nn.Module):
    """Time-conditioned UNet for 28x28 images (resolutions 28, 14, 7 with the default three levels).

    ``forward(x, t, label)``: ``t`` is the network's noise-level input (B,) (float; its units are
    the objective's business), ``label`` is a LongTensor (B,) or None. With ``num_classes`` set,
    ``label=None`` or ``label == num_classes`` means unconditional (the CFG null class).
    """

    def __init__(self, config: UNetConfig | dict | None = None, **kwargs):
        super().__init__()
        config = UNetConfig.of(config, **kwargs)
        self.config = config
        c = config
        ch = c.base_channels
        emb_dim = 4 * ch
        self.emb_ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.stem = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        chans = [ch * m for m in c.channel_mults]
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, cout in enumerate(chans):
            for _ in range(c.blocks_per_level):
                self.down.append(ResBlock(cur, cout, emb_dim, c.dropout))
                cur = cout
                skips.append(cur)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, emb_dim, c.dropout)
        self.mid_attn = SelfAttention(cur) if c.attention else nn.Identity()
        self.mid2 = ResBlock(cur, cur, emb_dim, c.dropout)
        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            for _ in range(c.blocks_per_level + 1):
                self.up.append(ResBlock(cur + skips.pop(), cout, emb_dim, c.dropout))
                cur = cout
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(), nn.Conv2d(cur, c.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The time (and label) embedding every ResBlock is modulated with, (B, 4 * base_channels)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.emb_ch).to(x.dtype))
        if self.label_emb is not None:
            if label is None:
                label = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(label.to(x.device).long())
        return emb

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder and the bottleneck: (bottleneck features, the skips the decoder consumes)."""
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        return self.mid2(self.mid_attn(self.mid1(h, emb)), emb), hs

    @staticmethod
    def decode(layers, h: torch.Tensor, hs: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Run decoder ``layers`` on ``h``, popping a skip from ``hs`` for every ResBlock."""
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(x, t, label)
        h, hs = self.encode(x, emb)
        return self.out(self.decode(self.up, h, hs, emb))


@dataclass
class GatingConfig(_Config):
    num_experts: int = 5
    channels: int = 32


def gating_inputs(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gating network sees the noisy image at unit scale and log(sigma), whatever the objective."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
    x_in = x / torch.sqrt(sigma**2 + 1)[:, None, None, None]
    return x_in, torch.log(sigma.clamp_min(1e-5))


class GatingNet(nn.Module):
    """Small CNN predicting logits over K experts from (x_sigma, sigma)."""

    def __init__(self, config: GatingConfig | dict | None = None, **kwargs):
        super().__init__()
        config = GatingConfig.of(config, **kwargs)
        self.config = config
        ch = config.channels
        self.emb = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 4 * ch))
        self.conv1 = nn.Conv2d(1, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(2 * ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, config.num_experts))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_in, log_sigma = gating_inputs(x, sigma)
        e = self.emb(timestep_embedding(log_sigma * 100.0, self.config.channels).to(x.dtype))
        h = F.silu(self.conv1(x_in))
        h = F.silu(self.conv2(h))
        scale, shift = e[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv3(h * (1 + scale) + shift))
        return self.head(h.mean(dim=(2, 3)))


def route_each(assign: torch.Tensor, k: int, run) -> torch.Tensor:
    """Each input through its assigned module: ``run(j, idx)`` computes module j's outputs on the
    inputs at ``idx`` (those ``assign`` gives to j); the outputs come back in the inputs' order.
    Every module is run, on an empty batch when nothing is assigned to it, so that all parameters
    are in the graph, as DDP needs."""
    order, outs = [], []
    for j in range(k):
        idx = (assign == j).nonzero().squeeze(1)
        order.append(idx)
        outs.append(run(j, idx))
    return torch.cat(outs)[torch.argsort(torch.cat(order))]


@dataclass
class SharedMCLConfig(_Config):
    unet: dict = field(default_factory=dict)  # the UNet the hypotheses share (a UNetConfig as a dict)
    num_experts: int = 5
    head_blocks: int = 1  # decoder ResBlocks (at full resolution, the last ones) each hypothesis owns before its output convolution
    score_channels: int = 32


class ScoreHead(nn.Module):
    """K logits from the trunk's features at the split (B, C, 28, 28), its bottleneck (B, C', 7, 7)
    and its time embedding: two strided convolutions down to the bottleneck's size, a projection of
    the bottleneck added, FiLM by the embedding, global average pooling and an MLP. The last layer
    starts at zero, so an untrained head says 1/K for every hypothesis."""

    def __init__(self, split_ch: int, mid_ch: int, emb_dim: int, num_experts: int, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(split_ch, ch, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(mid_ch, 2 * ch, 1)
        self.film = nn.Linear(emb_dim, 4 * ch)
        self.mlp = nn.Sequential(nn.Linear(2 * ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, num_experts))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h: torch.Tensor, mid: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        g = self.conv2(F.silu(self.conv1(F.silu(h)))) + self.mid(mid)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return self.mlp(F.silu(g * (1 + scale) + shift).mean(dim=(2, 3)))


class SharedMCLNet(nn.Module):
    """K hypotheses on one UNet (Rupprecht et al. 2017; resilient MCL, Letzelter et al. 2023).

    The trunk is a ``UNet`` without its last ``head_blocks`` decoder ResBlocks and its output
    convolution; each hypothesis head owns a copy of those. A ``ScoreHead`` on the trunk's features
    gives one logit per hypothesis: trained by cross-entropy against the winning hypothesis, its
    softmax estimates the probability that each hypothesis wins, given the noisy image.

    ``forward(x, t, label)`` -> (every hypothesis's output (B, K, C, H, W), score logits (B, K)):
    one trunk pass. Training calls ``forward(..., assign=fn)`` (see ``routed``)."""

    def __init__(self, config: SharedMCLConfig | dict | None = None, **kwargs):
        super().__init__()
        config = SharedMCLConfig.of(config, **kwargs)
        self.config = config
        trunk = UNet(config.unet)
        last_level = trunk.config.blocks_per_level + 1  # ResBlocks at full resolution, the decoder's last layers
        if not 0 <= config.head_blocks <= last_level:
            raise ValueError(f"head_blocks must be in 0..{last_level}, got {config.head_blocks}")
        if config.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {config.num_experts}")
        split = len(trunk.up) - config.head_blocks
        head = nn.ModuleList(list(trunk.up[split:]) + [trunk.out])
        trunk.up = trunk.up[:split]
        trunk.out = nn.Identity()
        self.trunk = trunk
        self.heads = nn.ModuleList([copy.deepcopy(head) for _ in range(config.num_experts)])
        for h in self.heads:  # each its own random start (the zero-initialised output layers too): identical heads would never differ
            for m in h.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.reset_parameters()
        emb_dim = 4 * trunk.config.base_channels
        last = trunk.up[-1]  # the trunk's last layer: a ResBlock or an upsampling (Upsample, Conv2d)
        split_ch = last.conv2.out_channels if isinstance(last, ResBlock) else last[1].out_channels
        mid_ch = trunk.config.base_channels * trunk.config.channel_mults[-1]
        self.score = ScoreHead(split_ch, mid_ch, emb_dim, config.num_experts, config.score_channels)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @classmethod
    def from_unet(cls, unet: UNet, num_experts: int, head_blocks: int = 1, score_channels: int = 32, noise: float = 0.0,
                  generator: torch.Generator | None = None) -> SharedMCLNet:
        """Hypotheses that all start as ``unet`` (a warm start): the trunk takes its weights, every
        head a copy of its last layers, perturbed by ``noise`` times each tensor's std to break
        the symmetry."""
        net = cls(SharedMCLConfig(unet.config.to_dict(), num_experts, head_blocks, score_channels))
        net.to(next(unet.parameters()).dtype)
        state = unet.state_dict()
        split = len(unet.up) - head_blocks
        trunk = {k: v for k, v in state.items() if not k.startswith("out.") and not (k.startswith("up.") and int(k.split(".")[1]) >= split)}
        net.trunk.load_state_dict(trunk)
        for head in net.heads:
            own = {}
            for k, v in state.items():
                if k.startswith("up.") and int(k.split(".")[1]) >= split:
                    i = int(k.split(".")[1]) - split
                    own[f"{i}.{k.split('.', 2)[2]}"] = v
                elif k.startswith("out."):
                    own[f"{head_blocks}.{k.split('.', 1)[1]}"] = v
            head.load_state_dict(own)
            if noise:
                with torch.no_grad():
                    for p in head.parameters():
                        p.add_(noise * p.std(correction=0) * torch.randn(p.shape, generator=generator).to(p))
        return net

    def trunk_features(self, x, t, label=None):
        """(features at the split, the skips its heads consume, the embedding, the bottleneck)."""
        emb = self.trunk.embed(x, t, label)
        mid, hs = self.trunk.encode(x, emb)
        return UNet.decode(self.trunk.up, mid, hs, emb), hs, emb, mid

    def head(self, k: int, h, hs, emb) -> torch.Tensor:
        layers = self.heads[k]
        return layers[-1](UNet.decode(layers[:-1], h, list(hs), emb))

    def forward(self, x, t, label=None, assign=None):
        """Inference: (outputs (B, K, C, H, W), logits (B, K)). Training (``assign`` a function of
        the K outputs computed without autograd, returning one hypothesis per example (B,)):
        (the assigned hypothesis's output with gradient (B, C, H, W), the K outputs without it,
        logits computed on detached trunk features, the assignment). Every head takes part in the
        graph (on an empty batch when nothing is assigned to it), as DDP needs."""
        h, hs, emb, mid = self.trunk_features(x, t, label)
        if assign is None:
            return torch.stack([self.head(k, h, hs, emb) for k in range(self.num_experts)], dim=1), self.score(h, mid, emb)
        with torch.no_grad():
            every = torch.stack([self.head(k, h, hs, emb) for k in range(self.num_experts)], dim=1)
        chosen = assign(every)
        out = route_each(chosen, self.num_experts, lambda k, idx: self.head(k, h[idx], [s[idx] for s in hs], emb[idx]))
        logits = self.score(h.detach(), mid.detach(), emb.detach())
        return out, every, logits, chosen


class HypothesisNet(nn.Module):
    """One hypothesis of a ``SharedMCLNet`` as a plain network ``(x, t, label) -> output``: the
    trunk and that hypothesis's head only (what ``expert:K`` routing and its tests run)."""

    def __init__(self, shared: SharedMCLNet, k: int):
        super().__init__()
        self.shared, self.k = shared, int(k)

    def forward(self, x, t, label=None):
        h, hs, emb, _ = self.shared.trunk_features(x, t, label)
        return self.shared.head(self.k, h, hs, emb)


CLASSIFIER_ARCHS = ("vgg", "gap")


@dataclass
class ClassifierConfig(_Config):
    channels: int = 32
    feature_dim: int = 128
    num_classes: int = 10
    arch: str = "vgg"  # vgg: two 3x3 conv pairs and a dense layer (the metrics' classifier); gap: 5x5 convs and global average pooling


def _conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]


class Classifier(nn.Module):
    """Digit classifier on images in [-1, 1]; ``features`` is the space the metrics work in.

    ``arch="vgg"`` (the ``classifier`` checkpoint): two pairs of 3x3 convolutions with max-pooling,
    then a dense layer of ``feature_dim``. ``arch="gap"`` (``classifier2``, the independent second
    reading): 5x5 convolutions (one at full resolution, two at half), a 3x3 one to ``feature_dim``
    channels, and global average pooling instead of a dense layer."""

    def __init__(self, config: ClassifierConfig | dict | None = None, **kwargs):
        super().__init__()
        config = ClassifierConfig.of(config, **kwargs)
        if config.arch not in CLASSIFIER_ARCHS:
            raise ValueError(f"unknown classifier arch {config.arch!r}; expected one of {', '.join(CLASSIFIER_ARCHS)}")
        self.config = config
        ch = config.channels
        if config.arch == "vgg":
            self.body = nn.Sequential(
                *_conv_bn(1, ch, 3), *_conv_bn(ch, ch, 3), nn.MaxPool2d(2),
                *_conv_bn(ch, 2 * ch, 3), *_conv_bn(2 * ch, 2 * ch, 3), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * ch * 49, config.feature_dim), nn.ReLU(),
            )
        else:
            self.body = nn.Sequential(
                *_conv_bn(1, ch, 5), nn.MaxPool2d(2),
                *_conv_bn(ch, 2 * ch, 5), *_conv_bn(2 * ch, 2 * ch, 5), nn.MaxPool2d(2),
                *_conv_bn(2 * ch, config.feature_dim, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


NETWORKS = {"unet": (UNet, UNetConfig), "mcl_shared": (SharedMCLNet, SharedMCLConfig), "gating": (GatingNet, GatingConfig), "classifier": (Classifier, ClassifierConfig)}


def build_network(kind: str, config: dict) -> nn.Module:
    """Rebuild a network from its kind and config dict (as stored in checkpoint metadata)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(NETWORKS)}")
    cls, _ = NETWORKS[kind]
    return cls(config)
