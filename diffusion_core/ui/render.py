"""Rendering shared by every tab: nearest-neighbour upscaling, image grids (``render_grid`` /
``split_grid``), PNG bytes, live frames, labelled strips, the filmstrip, the animated GIF, the
expert-usage chart of MCL."""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..mcl import routing_needs_gate
from ..palette import expert_color
from ..pipeline import to_uint8
from .common import BACKGROUND, GAP, SCALE


def hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return tuple(int(c[i : i + 2], 16) for i in (0, 2, 4))


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor ((H,W) or (H,W,C)); exact, no smoothing."""
    if factor == 1:
        return np.ascontiguousarray(img)
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid of ``n`` images: as square as possible."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def render_grid(images: np.ndarray, scale: int = SCALE, gap: int = GAP, border: list[str | None] | None = None,
                border_width: int = 0) -> np.ndarray:
    """(N, 28, 28) uint8 -> one image: tiles upscaled by ``scale`` and separated by ``gap`` pixels.

    Grayscale (H, W) unless ``border`` gives a colour per tile (then RGB with a coloured frame of
    ``border_width`` pixels drawn inside each tile's gap area)."""
    images = np.asarray(images)
    n, h, w = images.shape
    rows, cols = grid_shape(n)
    th, tw = h * scale, w * scale
    H, W = rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap
    if border is not None:
        H, W = H + 2 * border_width, W + 2 * border_width
        out = np.full((H, W, 3), BACKGROUND, dtype=np.uint8)
    else:
        out = np.full((H, W), BACKGROUND, dtype=np.uint8)
    off = border_width if border is not None else 0
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = off + r * (th + gap), off + c * (tw + gap)
        tile = upscale(images[i], scale)
        if border is not None:
            if border[i] is not None and border_width:
                bw = border_width
                out[y - bw : y + th + bw, x - bw : x + tw + bw] = hex_rgb(border[i])
            out[y : y + th, x : x + tw] = tile[..., None]
        else:
            out[y : y + th, x : x + tw] = tile
    return out


def render_rgb_grid(tiles: np.ndarray, scale: int = SCALE, gap: int = GAP) -> np.ndarray:
    """(N, 28, 28, 3) uint8 RGB tiles -> one RGB image laid out as ``render_grid`` lays out grayscale ones."""
    tiles = np.asarray(tiles)
    n, h, w, _ = tiles.shape
    rows, cols = grid_shape(n)
    th, tw = h * scale, w * scale
    out = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), BACKGROUND, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = upscale(tiles[i], scale)
    return out


V_RANGE = 2.5  # a velocity is shown from -2.5 (blue) through 0 (white) to +2.5 (red)


def velocity_tiles(v: torch.Tensor) -> np.ndarray:
    """Velocities (N, 1, 28, 28) -> (N, 28, 28, 3) uint8: blue negative, white zero, red positive."""
    u = (v[:, 0].detach().float().cpu() / V_RANGE).clamp(-1, 1).numpy()
    rgb = np.stack([1 - np.clip(-u, 0, 1), 1 - np.abs(u), 1 - np.clip(u, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def split_grid(grid: np.ndarray, n: int, scale: int = SCALE, gap: int = GAP, size: int = 28) -> np.ndarray:
    """Inverse of ``render_grid`` (no border): the (N, 28, 28) samples of a grid image."""
    grid = np.asarray(grid)
    if grid.ndim == 3:
        grid = grid[..., 0]
    rows, cols = grid_shape(n)
    t = size * scale
    out = np.empty((n, size, size), dtype=grid.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (t + gap), c * (t + gap)
        out[i] = grid[y : y + t : scale, x : x + t : scale]
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data_or_path) -> np.ndarray:
    if isinstance(data_or_path, (bytes, bytearray)):
        data_or_path = io.BytesIO(data_or_path)
    with Image.open(data_or_path) as im:
        return np.array(im)


def frame_scale(n: int, target: int = 224) -> int:
    """Upscaling of live frames: about ``target`` pixels wide whatever the number of images."""
    _, cols = grid_shape(n)
    return max(1, target // (28 * cols))


@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def vp_frame(x: torch.Tensor, sigma: float) -> np.ndarray:
    """A state ``x = x0 + sigma * noise`` as displayable uint8 (N, 28, 28): divided by
    sqrt(1 + sigma^2) (the variance-preserving view), so noise looks like noise, not saturation."""
    return to_uint8(x / math.sqrt(1.0 + float(sigma) ** 2)).numpy()


def labelled_strip(tiles: list[list[np.ndarray]], col_labels: list[str], row_labels: list[str] | None = None,
                   borders: list[list[str | None]] | None = None, scale: int = 3, gap: int = 3) -> np.ndarray:
    """Rows of 28x28 tiles with a header of column labels and optional row labels -> RGB image."""
    rows, cols = len(tiles), len(tiles[0]) if tiles else 0
    t = 28 * scale
    bw = 2 if borders is not None else 0
    cell = t + 2 * bw
    font = _font(12)
    head = 18
    left = 0
    if row_labels:
        left = max(int(font.getlength(lbl)) for lbl in row_labels) + 8
    W = left + cols * cell + (cols - 1) * gap + 2
    H = head + rows * cell + (rows - 1) * gap + 2
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, lbl in enumerate(col_labels):
        x = left + c * (cell + gap) + cell // 2
        draw.text((x, 2), lbl, fill=(60, 60, 60), font=font, anchor="ma")
    arr = np.array(canvas)
    for r in range(rows):
        for c in range(cols):
            y, x = head + r * (cell + gap), left + c * (cell + gap)
            color = borders[r][c] if borders is not None else None
            if color is not None:
                arr[y : y + cell, x : x + cell] = hex_rgb(color)
            arr[y + bw : y + bw + t, x + bw : x + bw + t] = upscale(tiles[r][c], scale)[..., None]
    if row_labels:
        canvas = Image.fromarray(arr)
        draw = ImageDraw.Draw(canvas)
        for r, lbl in enumerate(row_labels):
            y = head + r * (cell + gap) + cell // 2
            draw.text((left - 6, y), lbl, fill=(30, 30, 30), font=font, anchor="rm")
        arr = np.array(canvas)
    return arr


def snapshot_indices(steps: int, count: int) -> list[int]:
    """``count`` step indices spread evenly over ``0..steps-1``, always ending with the last."""
    if steps <= count:
        return list(range(steps))
    idx = np.linspace(0, steps - 1, count).round().astype(int)
    return sorted(set(idx.tolist()))


@dataclass
class Recording:
    """What a trajectory left behind, as uint8 images (for filmstrip, GIF and chart)."""

    noise: np.ndarray  # (N, 28, 28) the starting noise
    x: list[np.ndarray]  # per step (N, 28, 28), VP view of the state after the step
    denoised: list[np.ndarray]  # per step (N, 28, 28) predicted clean image
    sigmas: list[float]  # per step, noise level after the step
    experts: np.ndarray | None  # (S, N) expert per step and image, MCL
    gate_probs: np.ndarray | None  # (S, N, K) gating probabilities, gated/soft routing
    num_experts: int = 0
    score_head: bool = False  # the probabilities are a shared MCL model's score head, not a separate gating network


def expert_borders(rec: Recording, step: int | None, count: int) -> list[str | None] | None:
    if rec.experts is None or step is None:
        return None
    return [expert_color(int(k)) for k in rec.experts[step][:count]]


def filmstrip(rec: Recording, columns: int = 8, max_rows: int = 4) -> np.ndarray:
    """Snapshots of the trajectory from noise to the final image (RGB). One image: rows for the
    state x_t and the predicted clean image; several: one row per image (up to ``max_rows``).
    Under MCL each tile is framed in the colour of the expert that served it."""
    S = len(rec.x)
    idx = snapshot_indices(S, columns - 1)
    n = rec.noise.shape[0]
    labels = ["noise"] + [f"step {i + 1}" for i in idx]
    grey = None  # the noise column has no expert
    if n == 1:
        tiles = [[rec.noise[0]] + [rec.x[i][0] for i in idx], [np.zeros_like(rec.noise[0])] + [rec.denoised[i][0] for i in idx]]
        row_labels = ["x_t", "predicted x_0"]
        tiles[1][0] = np.full_like(rec.noise[0], BACKGROUND)
        borders = None
        if rec.experts is not None:
            row = [grey] + [expert_color(int(rec.experts[i][0])) for i in idx]
            borders = [row, row]
    else:
        rows = min(n, max_rows)
        tiles = [[rec.noise[j]] + [rec.x[i][j] for i in idx] for j in range(rows)]
        row_labels = [f"image {j + 1}" for j in range(rows)]
        borders = None
        if rec.experts is not None:
            borders = [[grey] + [expert_color(int(rec.experts[i][j])) for i in idx] for j in range(rows)]
    return labelled_strip(tiles, labels, row_labels, borders)


def _gif_palette() -> list[int]:
    pal = []
    for i in range(240):
        v = round(i * 255 / 239)
        pal += [v, v, v]
    from ..palette import EXPERT_COLORS

    for c in list(EXPERT_COLORS)[:16]:
        pal += list(hex_rgb(c))
    pal += [0, 0, 0] * (256 - len(pal) // 3)
    return pal


def write_gif(frames: list[np.ndarray], path=None, duration_ms: int = 90, hold_last_ms: int = 1500) -> bytes:
    """Frames (H,W) or (H,W,3) uint8 -> an animated GIF (looping; the last frame held)."""
    pal_img = Image.new("P", (1, 1))
    pal_img.putpalette(_gif_palette())
    ims = []
    for f in frames:
        im = Image.fromarray(f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=2)).convert("RGB")
        ims.append(im.quantize(palette=pal_img, dither=Image.Dither.NONE))
    durations = [duration_ms] * (len(ims) - 1) + [hold_last_ms]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0, disposal=1)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def gif_frames(rec: Recording, max_frames: int = 48) -> list[np.ndarray]:
    """Frames for the GIF: the state (and, for one image, the predicted clean image beside it)."""
    n = rec.noise.shape[0]
    S = len(rec.x)
    idx = snapshot_indices(S, max_frames)
    scale = 4 if n == 1 else max(1, frame_scale(n, 256))
    bw = 3 if rec.experts is not None else 0

    def frame(x, den, step):
        borders = expert_borders(rec, step, n) if step is not None else ([None] * n if bw else None)
        left = render_grid(x, scale, GAP, border=borders, border_width=bw) if borders is not None else render_grid(x, scale)
        if left.ndim == 2:
            left = np.repeat(left[..., None], 3, axis=2)
        if n != 1:
            return left
        right = render_grid(den, scale) if den is not None else np.zeros((28 * scale, 28 * scale), dtype=np.uint8)
        right = np.repeat(right[..., None], 3, axis=2)
        if right.shape[0] != left.shape[0]:
            pad = (left.shape[0] - right.shape[0]) // 2
            right = np.pad(right, ((pad, left.shape[0] - right.shape[0] - pad), (pad, pad), (0, 0)), constant_values=BACKGROUND)
        sep = np.full((left.shape[0], 8, 3), BACKGROUND, dtype=np.uint8)
        return np.concatenate([left, sep, right], axis=1)

    frames = [frame(rec.noise, None, None)]
    frames += [frame(rec.x[i], rec.denoised[i], i) for i in idx]
    return frames


def expert_usage(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(S, N) expert indices -> (S, K) share of the images served by each expert at each step."""
    experts = np.asarray(experts)
    S, N = experts.shape
    out = np.zeros((S, num_experts))
    for k in range(num_experts):
        out[:, k] = (experts == k).sum(axis=1) / N
    return out


def mean_gate_probs(probs: np.ndarray) -> np.ndarray:
    """(S, N, K) gating probabilities -> (S, K) mean over images."""
    return np.asarray(probs, dtype=np.float64).mean(axis=1)


SCORE_HEAD_SENTENCE = "how likely each expert is to be the one that owns this image, given the noisy image so far"


def expert_chart(rec: Recording, routing: str):
    """A matplotlib figure: the expert chosen at each step (one image) or each expert's share of
    the images per step (several), and the gating probabilities when the recording has them (the
    app records them for every routing; the title says when the routing does not use them).
    Colours are the palette's, one per expert."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    experts = rec.experts
    S, N = experts.shape
    K = rec.num_experts
    steps = np.arange(1, S + 1)
    panels = 2 if rec.gate_probs is not None else 1
    fig = Figure(figsize=(7, 2.3 * panels + 0.3), dpi=90, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    colors = [expert_color(k) for k in range(K)]
    ax = axes[0]
    if N == 1:
        e = experts[:, 0]
        ax.step(steps, e, where="mid", color="#999999", lw=1, zorder=1)
        ax.scatter(steps, e, c=[colors[int(k)] for k in e], s=40, zorder=2, edgecolors="white", linewidths=0.5)
        ax.set_yticks(range(K), [f"expert {k}" for k in range(K)])
        ax.set_ylim(-0.5, K - 0.5)
        ax.set_title(f"expert chosen at each step ({routing} routing)", fontsize=10, loc="left")
    else:
        shares = expert_usage(experts, K)
        bottom = np.zeros(S)
        for k in range(K):
            ax.bar(steps, shares[:, k], bottom=bottom, color=colors[k], width=0.9, label=f"expert {k}")
            bottom += shares[:, k]
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of images")
        ax.set_title(f"experts used at each step by {N} images ({routing} routing)", fontsize=10, loc="left")
    if rec.gate_probs is not None:
        ax2 = axes[1]
        probs = mean_gate_probs(rec.gate_probs)
        ax2.stackplot(steps, probs.T, colors=colors, labels=[f"expert {k}" for k in range(K)], step="mid" if S < 3 else None)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("probability")
        if rec.score_head:
            what = "score head: " + SCORE_HEAD_SENTENCE + ("" if routing_needs_gate(routing) else f" (not used by {routing} routing)")
        else:
            what = "gating probabilities" if routing_needs_gate(routing) else f"what the gating network thinks (not used by {routing} routing)"
        ax2.set_title(what + (" (mean over images)" if N > 1 else ""), fontsize=10, loc="left", wrap=True)
    handles = [Patch(color=colors[k], label=f"expert {k}") for k in range(K)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step")
    axes[-1].set_xlim(0.5, S + 0.5)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
        a.tick_params(labelsize=8)
    return fig
