"""The Compare tab: one seed, several samplers / routings / guidance scales, as a grid of
trajectories from the same starting noise."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..palette import expert_color
from ..pipeline import Settings, trajectory
from .common import COMPARE_AXES, DEFAULT_GUIDANCES, MAX_COMPARE_ROWS, SAMPLER_LABELS, ModelInfo, _name, parse_settings, sampler_choices
from .render import initial_noise, labelled_strip, snapshot_indices, vp_frame


def default_compare_values(axis: str, info: ModelInfo | None) -> str:
    if axis == "sampler":
        return ", ".join(s for _, s in sampler_choices())
    if axis == "routing":
        k = info.num_experts if info and info.is_mcl else 0
        return ", ".join([f"expert:{i}" for i in range(k)] + ["heuristic", "gated", "soft", "pooled"])
    return DEFAULT_GUIDANCES


def parse_compare(models: Mapping[str, ModelInfo], base: Settings, axis, values) -> list[Settings]:
    """The rows of a comparison: ``base`` with ``axis`` (sampler, routing or guidance) set to each
    of ``values`` (a list, or a comma-separated text). One image per row. Raises ``ValueError``."""
    axis = _name(axis, "compare axis") if axis is not None else "sampler"
    if axis not in COMPARE_AXES:
        raise ValueError(f"unknown compare axis {axis!r}; expected one of {', '.join(COMPARE_AXES)}")
    info = models[base.model]
    if axis == "routing" and not info.is_mcl:
        raise ValueError(f"comparing routing strategies needs the MCL model, not {base.model!r}")
    if axis == "guidance" and not info.conditional:
        raise ValueError(f"comparing guidance scales needs a class-conditional model (cfg), not {base.model!r}")
    if values is None or (isinstance(values, str) and not values.strip()):
        values = default_compare_values(axis, info)
    if isinstance(values, str):
        if len(values) > 1000:
            raise ValueError("the list of values to compare is too long")
        values = [v.strip() for v in values.replace(";", ",").split(",") if v.strip()]
    values = list(values)
    if not values:
        raise ValueError("give at least one value to compare")
    if len(values) > MAX_COMPARE_ROWS:
        raise ValueError(f"at most {MAX_COMPARE_ROWS} values can be compared at once, got {len(values)}")
    rows, seen = [], set()
    fields = base.to_dict()
    fields["n"] = 1
    for v in values:
        try:
            s = parse_settings(models, **dict(fields, **{axis: v}))
        except ValueError as e:
            raise ValueError(f"compare value {str(v)[:40]!r}: {e}") from None
        key = getattr(s, axis)
        if key not in seen:
            seen.add(key)
            rows.append(s)
    return rows


def _row_label(s: Settings, axis: str) -> str:
    if axis == "sampler":
        return SAMPLER_LABELS.get(s.sampler, s.sampler)
    if axis == "routing":
        return s.routing
    return f"guidance {s.guidance:g}"


def compare(registry, rows: list[Settings], axis: str, columns: int = 8) -> tuple[np.ndarray, dict]:
    """A grid of trajectories (RGB): one row per settings, columns from the shared starting noise
    through evenly spaced steps to the final image. Returns (image, {"axis", "rows": [settings]})."""
    axis = _name(axis, "compare axis")
    tiles, borders, any_border = [], [], False
    steps = rows[0].steps
    idx = snapshot_indices(steps, columns - 1)
    for s in rows:
        model, gate = registry.for_settings(s)
        noise = initial_noise(s)[0]
        row, brow = [noise], [None]
        states = {}
        for step in trajectory(s, model, gate):
            if step.index in idx:
                states[step.index] = (vp_frame(step.x, step.sigma_next)[0], None if step.expert is None else int(step.expert[0]))
        for i in idx:
            img, k = states[i]
            row.append(img)
            brow.append(None if k is None else expert_color(k))
            any_border |= k is not None
        tiles.append(row)
        borders.append(brow)
    labels = ["noise"] + [f"step {i + 1}" for i in idx]
    img = labelled_strip(tiles, labels, [_row_label(s, axis) for s in rows], borders if any_border else None, scale=3)
    return img, {"axis": axis, "rows": [s.to_dict() for s in rows]}
