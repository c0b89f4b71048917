"""The Models tab: a card per checkpoint (parameters, objective, training, measured quality, and
how it learned: its loss curve and sample grids, when the checkpoint records them), read from the
checkpoint's metadata without loading its weights."""
from __future__ import annotations

import html
import json
import math
import struct
from pathlib import Path

import gradio as gr

from ..checkpoints import read_config
from .common import CARD_TITLES, MODEL_BLURBS


def _param_count(path) -> int:
    """Number of parameters stored in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _fmt_value(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt_value(x)}" for k, x in v.items())
    return str(v)


def _fmt_duration(s) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return str(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def model_card(name: str, path) -> dict:
    """A model card as ordered sections of (label, value) rows, from the checkpoint metadata."""
    path = Path(path)
    config = read_config(path)
    kind = config.get("model", name)
    net = config.get("network", {})
    ncfg = net.get("config", {})
    overview = [("kind", kind), ("parameters", f"{_param_count(path):,}")]
    if kind == "mcl":
        overview.append(("experts", str(config.get("num_experts", "?"))))
    if net.get("kind") == "unet":
        overview.append(("network", f"UNet, {ncfg.get('base_channels')} base channels × {_fmt_value(ncfg.get('channel_mults', []))}"
                         + (", attention" if ncfg.get("attention") else "")))
    elif net.get("kind") == "mcl_shared":
        u = ncfg.get("unet") or {}
        overview.append(("network", f"one UNet trunk ({u.get('base_channels')} base channels × {_fmt_value(u.get('channel_mults', []))}), "
                         f"{ncfg.get('num_experts')} hypothesis heads of {ncfg.get('head_blocks')} ResBlock(s) and a score head"))
    elif net.get("kind"):
        overview.append(("network", net["kind"]))
    obj = config.get("objective")
    if obj:
        sched = obj.get("schedule") or {}
        text = obj.get("name", "?")
        if sched:
            text += f" ({sched.get('kind', '')} schedule, {sched.get('num_timesteps', '?')} steps)"
        overview.append(("objective", text))
    overview.append(("file", f"{path.name}, {path.stat().st_size / 1e6:.1f} MB"))
    tr = config.get("training") or {}
    training = []
    for key, label in [("wall_time_s", "training time"), ("device", "device"), ("init", "started from"), ("epochs", "epochs"),
                       ("steps", "optimizer steps"), ("images_seen", "images seen"), ("batch_size", "batch size"), ("lr", "learning rate"),
                       ("p_uncond", "label dropout"), ("teacher", "teacher"), ("teacher_weight", "teacher weight"),
                       ("wta", "winner-takes-all"), ("wta_scope", "winner decided per"), ("mcl_arch", "MCL architecture"),
                       ("ema_decay", "EMA decay")]:
        if tr.get(key) is not None:
            value = tr[key]
            if key == "wall_time_s":
                value = _fmt_duration(value)
            elif key == "init":
                value = Path(str(value)).name
            elif isinstance(value, int):
                value = f"{value:,}"
            else:
                value = _fmt_value(value)
            training.append((label, value))
    final = tr.get("final") or {}
    if isinstance(final.get("owned_rates"), list) and tr.get("wta_scope") == "example":
        training.append(("experts' shares of the data", ", ".join(f"{r:.0%}" for r in final["owned_rates"])))
    for key in ("loss", "accuracy", "score_accuracy"):
        if isinstance(final.get(key), (int, float)):
            training.append((f"final {key}", _fmt_value(final[key])))
    if tr.get("note"):
        training.append(("note", str(tr["note"])))
    quality = [(str(k), _fmt_value(v)) for k, v in (config.get("quality") or {}).items()]
    for key in ("test_accuracy",):
        if key in tr:
            quality.append((key.replace("_", " "), _fmt_value(tr[key])))
    return {"name": name, "title": CARD_TITLES.get(name, name), "blurb": MODEL_BLURBS.get(name) or MODEL_BLURBS.get(kind, ""),
            "sections": [("Model", overview), ("Training", training), ("Measured quality", quality)],
            "history": tr.get("history") if isinstance(tr.get("history"), dict) else None}


def loss_svg(points, width: int = 280, height: int = 90) -> str:
    """The loss curve ``[[step, loss], ...]`` as a small inline SVG (log-scaled loss axis)."""
    pts = [(float(a), float(b)) for a, b in points if isinstance(b, (int, float)) and b > 0 and math.isfinite(b)]
    if len(pts) < 2:
        return '<p class="none">too few loss records to draw</p>'
    x0, x1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
    ys = [math.log10(b) for _, b in pts]
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)
    pad_l, pad_b = 34, 14
    w, h = width - pad_l - 4, height - pad_b - 4
    coords = " ".join(f"{pad_l + (a - x0) / (x1 - x0) * w:.1f},{4 + (y1 - y) / (y1 - y0) * h:.1f}" for (a, _), y in zip(pts, ys))
    label = 'font-size="9" fill="currentColor"'
    return (f'<svg class="loss-curve" role="img" aria-label="training loss" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'<polyline points="{coords}" fill="none" stroke="#0072B2" stroke-width="1.4"/>'
            f'<line x1="{pad_l}" y1="{4 + h}" x2="{pad_l + w}" y2="{4 + h}" stroke="currentColor" stroke-width="0.5"/>'
            f'<text x="{pad_l - 3}" y="10" text-anchor="end" {label}>{10 ** y1:.3g}</text>'
            f'<text x="{pad_l - 3}" y="{4 + h}" text-anchor="end" {label}>{10 ** y0:.3g}</text>'
            f'<text x="{pad_l}" y="{height - 2}" {label}>step {x0:,.0f}</text>'
            f'<text x="{pad_l + w}" y="{height - 2}" text-anchor="end" {label}>{x1:,.0f}</text></svg>')


def history_html(history: dict | None) -> str:
    """The card's "How it learned" section: the loss curve and the sample grids after epochs 1, 5
    and the last, or a note that the checkpoint records none."""
    e = html.escape
    if not history:
        return '<h4>How it learned</h4><p class="none">no training history recorded (trained before histories were kept)</p>'
    parts = ['<h4>How it learned</h4><div class="history">', f'<div class="history-loss">{loss_svg(history.get("loss") or [])}</div>']
    for g in history.get("grids") or []:
        png = str(g.get("png", ""))
        if not png or not set(png) <= _BASE64:
            continue
        caption = f"after epoch {g.get('epoch')}"
        parts.append(f'<figure class="history-grid"><img src="data:image/png;base64,{png}" alt="samples {e(caption)}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


_BASE64 = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def card_html(card: dict) -> str:
    e = html.escape
    parts = [f'<div class="model-card"><h3>{e(card["title"])}</h3>']
    if card["blurb"]:
        parts.append(f'<p class="blurb">{e(card["blurb"])}</p>')
    for title, rows in card["sections"]:
        if not rows:
            if title == "Measured quality":
                parts.append(f'<h4>{e(title)}</h4><p class="none">not measured yet</p>')
            continue
        parts.append(f"<h4>{e(title)}</h4><table>")
        for k, v in rows:
            parts.append(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>")
        parts.append("</table>")
    parts.append(history_html(card.get("history")))
    parts.append("</div>")
    return "".join(parts)


def model_cards(registry) -> str:
    """HTML: a card per checkpoint present (diffusion models first, then gating and classifier)."""
    cards = []
    for name, path in registry.available().items():
        try:
            cards.append(card_html(model_card(name, path)))
        except (OSError, ValueError, KeyError, TypeError) as ex:
            cards.append(f'<div class="model-card"><h3>{html.escape(name)}</h3><p>unreadable checkpoint: {html.escape(str(ex))}</p></div>')
    if not cards:
        return f"<p>No checkpoints found in <code>{html.escape(str(registry.directory))}</code>.</p>"
    return '<div class="model-cards">' + "".join(cards) + "</div>"


def build(shared, tab):
    """The Models tab: the cards (refreshed on every page load: a checkpoint may have landed)."""
    cards = gr.HTML(model_cards(shared.registry))
    tab.select(lambda: "models", None, shared.active_tab, api_visibility="private", queue=False)
    return cards
