"""Colours shared by the evaluation figures and the app, so expert k has one colour everywhere.

The expert palette is Okabe & Ito's colour-blind-safe set (black moved to the end); beyond eight
experts it cycles.
"""
from __future__ import annotations

EXPERT_COLORS: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
)

# One colour per sampler in the quality-against-NFE figure.
SAMPLER_COLORS: dict[str, str] = {
    "dpmpp_2m": "#0072B2",
    "ddim": "#E69F00",
    "euler": "#009E73",
    "heun": "#CC79A7",
    "ddpm": "#D55E00",
}

FLOOR_COLOR = "#7F7F7F"  # the real-data floor drawn as a reference line


def expert_color(k: int) -> str:
    """The colour of expert ``k`` (0-based)."""
    return EXPERT_COLORS[int(k) % len(EXPERT_COLORS)]


def sampler_color(name: str) -> str:
    return SAMPLER_COLORS.get(name, "#333333")
