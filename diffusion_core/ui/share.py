"""Share links: every setting in a URL query and back; the decoded settings reproduce the identical
image. Generate's settings are the base of every link; ``tab=compare`` and ``tab=explore`` links
add their own fields (``LINK_FIELDS``, read by ``links.parse_link``)."""
from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

from ..pipeline import Settings
from .common import SHARE_FIELDS, SHARE_VERSION, ModelInfo, parse_settings

LINK_FIELDS = ("tab", "axis", "values", "index", "drawing", "level", "region", "cold", "degradation")  # the other tabs' fields
MAX_LINK_VALUE_CHARS = 4000  # the longest field (an encoded drawing) is about 1.1k characters


def _fmt_float(x: float) -> str:
    return repr(float(x))  # round-trips exactly


def share_query(s: Settings, info: ModelInfo) -> str:
    """``?v=1&model=...``: every setting that applies to the model, exactly."""
    params = [("v", SHARE_VERSION), ("model", s.model)]
    if info.conditional:
        params += [("digit", "any" if s.digit is None else str(s.digit)), ("guidance", _fmt_float(s.guidance))]
    params += [("sampler", s.sampler), ("steps", str(s.steps))]
    if s.sampler == "ddim":
        params.append(("eta", _fmt_float(s.eta)))
    if info.is_mcl:
        params.append(("routing", s.routing))
    if not info.conditional and s.autoguidance != 1:  # a link without it is the model alone, as before autoguidance
        params += [("autoguidance", _fmt_float(s.autoguidance)), ("guide", s.guide)]
        if s.autoguide != "output":  # a link without it compares the guide with the output, as before it existed
            params.append(("autoguide", s.autoguide))
    params += [("seed", str(s.seed)), ("n", str(s.n))]
    return "?" + urlencode(params, safe=":")


def _query_items(query) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, str):
        q = query.split("?", 1)[1] if "?" in query else query
        q = q.split("#", 1)[0]
        return parse_qsl(q, keep_blank_values=True)
    if hasattr(query, "multi_items"):  # starlette QueryParams
        return list(query.multi_items())
    if isinstance(query, Mapping):
        return [(str(k), str(v)) for k, v in query.items()]
    return [(str(k), str(v)) for k, v in query]


def split_query(query) -> tuple[dict[str, str], list[str]]:
    """A share link's query -> (its fields: Generate's, ``v`` and ``LINK_FIELDS``; notes on the others).
    ``ValueError`` for too many parameters, a repeated field or an over-long value."""
    items = _query_items(query)
    if len(items) > 50:
        raise ValueError("this share link is malformed: too many parameters")
    ours: dict[str, str] = {}
    notes = []
    for k, v in items:
        if k in SHARE_FIELDS or k in LINK_FIELDS or k == "v":
            if k in ours:
                raise ValueError(f"this share link is malformed: {k!r} is given more than once")
            if len(v) > MAX_LINK_VALUE_CHARS:
                raise ValueError(f"this share link is malformed: {k} is too long ({len(v)} characters)")
            ours[k] = v
        elif not k.startswith("_") and k not in ("view", "logs"):
            notes.append(f"ignored unknown share-link parameter {k[:40]!r}")
    return ours, notes


def settings_from_query(models: Mapping[str, ModelInfo], query) -> tuple[Settings | None, list[str]]:
    """A share link's query (string, mapping, or starlette ``QueryParams``) -> (Settings, notes).

    Returns ``(None, [])`` when the query holds no settings (a plain visit). Raises ``ValueError``
    ("this share link is malformed: ...") for bad values, repeated fields or an unknown version.
    Parameters the app does not know (a host may add its own) are ignored and listed in the notes.
    """
    ours, notes = split_query(query)
    if not any(k in SHARE_FIELDS for k in ours):
        return None, []
    version = ours.pop("v", SHARE_VERSION)
    if version != SHARE_VERSION:
        raise ValueError(f"this share link is malformed: version {version[:20]!r} is not supported (this app writes v={SHARE_VERSION})")
    try:
        return parse_settings(models, **{k: v for k, v in ours.items() if k in SHARE_FIELDS}), notes
    except ValueError as e:
        raise ValueError(f"this share link is malformed: {e}") from None
