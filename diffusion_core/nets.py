"""Networks for 1x28x28 images: a time-conditioned UNet, a gating network and a digit classifier.

Every network is built from a plain ``dict`` config so that it can be stored in a checkpoint's
metadata and rebuilt without unpickling anything (see ``diffusion_core.checkpoints``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

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
        if config is None:
            config = UNetConfig(**kwargs)
        elif isinstance(config, dict):
            config = UNetConfig.from_dict(config)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.emb_ch).to(x.dtype))
        if self.label_emb is not None:
            if label is None:
                label = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(label.to(x.device).long())
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)


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
        if config is None:
            config = GatingConfig(**kwargs)
        elif isinstance(config, dict):
            config = GatingConfig.from_dict(config)
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
        if config is None:
            config = ClassifierConfig(**kwargs)
        elif isinstance(config, dict):
            config = ClassifierConfig.from_dict(config)
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


NETWORKS = {"unet": (UNet, UNetConfig), "gating": (GatingNet, GatingConfig), "classifier": (Classifier, ClassifierConfig)}


def build_network(kind: str, config: dict) -> nn.Module:
    """Rebuild a network from its kind and config dict (as stored in checkpoint metadata)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(NETWORKS)}")
    cls, _ = NETWORKS[kind]
    return cls(config)
