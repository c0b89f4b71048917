"""The report: the markdown table, results.md, and the measured quality written into the
checkpoints' metadata (``record_quality``), which the Models tab shows."""
from __future__ import annotations

import math

from ..checkpoints import update_config
from ..pipeline import APP_AUTOGUIDANCE, APP_GUIDANCE, DEFAULT_GUIDES, Settings
from .config import CONFIDENCE, NUM_CLASSES, guide_label, routing_label
from .diagnosis import diagnosis_markdown

# Table


def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    return format(v + 0.0, spec)  # + 0.0 turns -0.0 into 0.0


TABLE_COLUMNS = ("row", "sampler", "steps", "NFE", "FD", "FD floor", "FD/floor", "precision", "recall", "accuracy", "entropy", f"conf>{CONFIDENCE:g}", "modes",
                 "FD/floor (2)", "accuracy (2)", f"conf>{CONFIDENCE:g} (2)", "time (s)")  # (2): the second classifier


def format_table(records: list[dict]) -> str:
    """A markdown table of result rows (``results.json`` entries)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for r in records:
        m, s = r["metrics"], r["settings"]
        m2 = m.get("second_classifier") or {}
        cells = [
            r["name"], s["sampler"], str(s["steps"]), str(r["nfe"]),
            _fmt(m["frechet"], ".3g"), _fmt(m["frechet_floor"], ".3g"), _fmt(m["frechet_ratio"], ".2f"),
            _fmt(m["precision"], ".3f"), _fmt(m["recall"], ".3f"), _fmt(m["accuracy"], ".3f"),
            _fmt(m["entropy"], ".3f"), _fmt(m["confident"], ".3f"), f"{m['modes_covered']}/{NUM_CLASSES}",
            _fmt(m2.get("frechet_ratio"), ".2f"), _fmt(m2.get("accuracy"), ".3f"), _fmt(m2.get("confident"), ".3f"),
            _fmt(r["sample_seconds"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# Row names as main_rows writes them (the app's defaults first: guidance, routing, autoguidance and its guide).
_AG = {k: f" ag={w:g} {DEFAULT_GUIDES[k]}" if w != 1 else "" for k, w in APP_AUTOGUIDANCE.items()}
HEADLINE_ROWS = {"ddpm": (f"ddpm{_AG['ddpm']}", "ddpm"), "cfg": (f"cfg g={APP_GUIDANCE['cfg']:g}",), "flow": (f"flow g={APP_GUIDANCE['flow']:g}",),
                 "mcl": (f"mcl {routing_label(Settings().routing)}{_AG['mcl']}", f"mcl {routing_label(Settings().routing)}", "mcl heuristic")}
# The row a model card shows beside its headline, when the headline is autoguided.
UNGUIDED_ROWS = {"ddpm": "ddpm", "mcl": f"mcl {routing_label(Settings().routing)}"}


def quality_summary(record: dict, command: str) -> dict:
    """The numbers of one result row, as a model card shows them."""
    m, s = record["metrics"], record["settings"]
    how = f"{s['sampler']}, {s['steps']} steps, {s['n']} samples, seed {s['seed']}"
    if record["group"] in ("cfg", "flow"):
        how += f", guidance {s['guidance']:g}"
    if record["group"] == "mcl":
        how += f", {s['routing']} routing"
    if s.get("autoguidance", 1) != 1:
        how += f", autoguidance {s['autoguidance']:g} ({guide_label(s['guide'])})"
    q = {"measured on": how, "Frechet distance": round(m["frechet"], 3), "real-data floor": round(m["frechet_floor"], 3),
         "distance / floor": None if m["frechet_ratio"] is None else round(m["frechet_ratio"], 2),
         "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}
    if m["accuracy"] is not None:
        q["digit accuracy"] = round(m["accuracy"], 4)
    q.update({"class entropy": round(m["entropy"], 3), "confidence > 0.9": round(m["confident"], 3)})
    m2 = m.get("second_classifier")
    if m2:
        q["second classifier"] = {k: round(v, 4 if k == "accuracy" else 3) for k, v in
                                  (("accuracy", m2["accuracy"]), ("distance / floor", m2["frechet_ratio"]), ("confidence > 0.9", m2["confident"]))
                                  if v is not None}
    q["command"] = command
    return q


def record_quality(records: list[dict], paths: dict, command: str) -> dict[str, str]:
    """Write each diffusion model's headline row (DDPM; CFG and flow at the app's default guidance; MCL with
    the app's default routing) into its checkpoint's ``quality`` metadata, which the app's model
    cards show. Returns {model: row name} for the checkpoints updated."""
    by_name = {r["name"]: r for r in records}
    done = {}
    for model, candidates in HEADLINE_ROWS.items():
        row = next((by_name[c] for c in candidates if c in by_name), None)
        if row is not None and model in paths:
            q = quality_summary(row, command)
            plain = by_name.get(UNGUIDED_ROWS.get(model, ""))
            if row["settings"].get("autoguidance", 1) != 1 and plain is not None:
                p = plain["metrics"]
                q["without autoguidance"] = {"distance / floor": round(p["frechet_ratio"], 2), "confidence > 0.9": round(p["confident"], 3),
                                             "class entropy": round(p["entropy"], 3)}
            update_config(paths[model], {"quality": q})
            done[model] = row["name"]
    for guide in set(DEFAULT_GUIDES.values()):  # a weak model's card: its quality alone (the ag=0 row)
        row = by_name.get(f"ddpm ag=0 {guide}")
        if row is not None and f"guide {guide}" in paths:
            update_config(paths[f"guide {guide}"], {"quality": quality_summary(row, command)})
            done[guide] = row["name"]
    return done


def results_markdown(results: dict) -> str:
    cfg = results["config"]
    parts = [f"Main rows: n={cfg['n']} samples each, {cfg['samplers'][0]} sampler, {cfg['steps']} steps, seed {cfg['seed']}. "
             f"Metrics in the feature space of the MNIST classifier (test accuracy {results['reference']['classifier_test_accuracy']:.4f}); "
             "FD floor: real training images against the test set at the same sample count.", "", format_table(results["rows"])]
    if any("fid_inception" in r["metrics"] for r in results["rows"]):
        parts += ["", "| row | InceptionV3 FID |", "|---|---:|"] + [f"| {r['name']} | {r['metrics']['fid_inception']:.3g} |" for r in results["rows"]]
    if results.get("mcl_diagnosis"):
        parts += ["", diagnosis_markdown(results["mcl_diagnosis"])]
    if results["sweep"]:
        parts += ["", f"Sampler sweep: {results['sweep'][0]['settings']['model']}, n={cfg['sweep_n']} samples each.", "", format_table(results["sweep"])]
    return "\n".join(parts)
