"""Opening a share link: which tab it is for and everything that tab needs, validated.

* a Generate link (``?v=1&model=...``, no ``tab``): the settings;
* ``tab=compare``: the base settings, the axis and its values (the comparison's rows);
* ``tab=explore``: the base settings and the SDEdit fields (``index`` or ``drawing``, ``level``,
  ``region``);
* ``tab=cold``: a cold-diffusion result of Explore's panel (``cold=restore`` with ``level`` and
  ``index`` or ``drawing``; ``cold=generate`` with ``seed``, ``n``, ``sampler``), no base settings.

Anything wrong raises ``ValueError("this share link is malformed: ...")``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import explore as ex
from ..pipeline import Settings
from .cold_panel import cold_settings_from_link
from .common import SHARE_FIELDS, SHARE_VERSION, ModelInfo, parse_settings
from .compare_tab import parse_compare, row_value
from .explore_tab import edit_from_fields
from .share import split_query

TABS = ("generate", "compare", "explore", "cold")


@dataclass
class Link:
    tab: str = "generate"
    settings: Settings | None = None  # None: a plain visit (the defaults)
    axis: str | None = None  # compare
    values: list[str] = field(default_factory=list)
    rows: list[Settings] = field(default_factory=list)
    edit: ex.EditSettings | None = None  # explore
    cold: dict | None = None  # cold: the settings object of cold_panel (kind cold_restore or cold_generate)
    notes: list[str] = field(default_factory=list)

    @property
    def is_plain(self) -> bool:
        return self.settings is None and self.edit is None and not self.rows and self.cold is None


def parse_link(models: Mapping[str, ModelInfo], query, default_model: str | None = None) -> Link:
    """A share link (its URL or query, a mapping or starlette ``QueryParams``) -> ``Link``."""
    ours, notes = split_query(query)
    if not ours:
        return Link(notes=notes)
    version = ours.pop("v", SHARE_VERSION)
    if version != SHARE_VERSION:
        raise ValueError(f"this share link is malformed: version {version[:20]!r} is not supported (this app writes v={SHARE_VERSION})")
    tab = ours.pop("tab", "generate").strip().lower()
    if tab not in TABS:
        raise ValueError(f"this share link is malformed: unknown tab {tab[:20]!r}; expected one of {', '.join(TABS)}")
    if tab == "cold":
        try:
            return Link(tab="cold", cold=cold_settings_from_link(ours), notes=notes)
        except ValueError as e:
            raise ValueError(f"this share link is malformed: {e}") from None
    own = {"compare": ("axis", "values"), "explore": ("index", "drawing", "level", "region")}
    stray = sorted(k for k in ours if k not in SHARE_FIELDS and k not in own.get(tab, ()))
    if stray:
        raise ValueError(f"this share link is malformed: {', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not belong to a {tab} link")
    base_fields = {k: v for k, v in ours.items() if k in SHARE_FIELDS}
    if tab == "generate" and not base_fields:
        return Link(notes=notes)
    if "model" not in base_fields and default_model is not None and default_model in models:
        base_fields["model"] = default_model
    try:
        if tab != "generate":
            base_fields["n"] = "1"
        base = parse_settings(models, **base_fields)
        link = Link(tab=tab, settings=base, notes=notes)
        if tab == "compare":
            if "values" not in ours:
                raise ValueError("a compare link needs its values")
            link.axis = ours.get("axis", "sampler")
            link.rows = parse_compare(models, base, link.axis, ours["values"], ours.get("autoguide"))
            link.values = [row_value(s, link.axis) for s in link.rows]
        elif tab == "explore":
            if ("index" in ours) == ("drawing" in ours):
                raise ValueError("an explore link needs either index or drawing")
            link.edit = edit_from_fields(models, base, ours)
        return link
    except ValueError as e:
        raise ValueError(f"this share link is malformed: {e}") from None
