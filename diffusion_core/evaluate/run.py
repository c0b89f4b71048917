"""The whole evaluation: sample every row, score it, diagnose MCL, write results.json,
results.md and the figures."""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .. import metrics
from ..data import load_mnist
from ..mcl import routing_cost
from .config import (
    EvalConfig,
    _log,
    main_rows,
    nfe,
    specs_need_gate,
    sweep_model_name,
    sweep_rows,
)
from .diagnosis import mcl_diagnosis, specialisation_summary
from .figures import make_figures
from .reference import load_inception, real_floor, reference_features
from .report import _finite, record_quality, results_markdown
from .sampling import file_sha256, images_sha256, load_models, sample_row, to_float
from .scores import row_metrics, second_classifier_metrics

# The whole evaluation


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = _log, command: str | None = None) -> dict:
    """Run every row, write results.json, results.md and the figures to ``cfg.out_dir``; return the results."""
    cfg.validate()
    t_all = time.perf_counter()
    device = torch.device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    routings_need_gate = "mcl" in cfg.models and specs_need_gate(cfg.routings)
    sweep_gated = cfg.sweep_n and sweep_model_name(cfg) == "mcl"
    models = load_models(cfg.models, cfg.checkpoint_dir, device, need_gating=bool(routings_need_gate or sweep_gated), want_gating=cfg.figures,
                         guides=cfg.guides if cfg.autoguidance else (), classifier2=cfg.classifier2)
    K = models.num_experts
    rows = main_rows(cfg, K)
    sweep = sweep_rows(cfg)

    t0 = time.perf_counter()
    max_n = max(cfg.n, cfg.sweep_n)
    reference = reference_features(models.classifier, cfg.data_dir, max_n, cfg.seed, device, cfg.batch_size)
    floors = {n: real_floor(reference, n, cfg.k, device) for n in sorted({cfg.n, cfg.sweep_n} - {0})}
    log(f"reference: classifier accuracy on the MNIST test set {reference.classifier_accuracy:.4f}; "
        + "; ".join(f"floor at n={n}: FD {f['frechet']:.4g}, precision {f['precision']:.3f}, recall {f['recall']:.3f}" for n, f in floors.items())
        + f" ({time.perf_counter() - t0:.1f} s)")
    reference2 = floors2 = None
    if models.classifier2 is not None:
        reference2 = reference_features(models.classifier2, cfg.data_dir, max_n, cfg.seed, device, cfg.batch_size)
        floors2 = {n: real_floor(reference2, n, cfg.k, device) for n in floors}
        log(f"second classifier: accuracy on the MNIST test set {reference2.classifier_accuracy:.4f}; "
            + "; ".join(f"floor at n={n}: FD {f['frechet']:.4g}" for n, f in floors2.items()))

    inception, inception_note = (None, "not requested")
    if cfg.fid_inception:
        inception, inception_note = load_inception(device, log)
        if inception is not None:
            test_x, _ = load_mnist(cfg.data_dir, train=False)
            test_u8 = ((test_x[:, 0] + 1) * 127.5).round().to(torch.uint8)
            inc_test = inception(test_u8, cfg.batch_size)
            inc_mu, inc_cov = metrics.feature_stats(inc_test)

    records, sweep_records, expert_preds = [], [], {}
    all_rows = [(r, "main") for r in rows] + [(r, "sweep") for r in sweep]
    for i, (row, table) in enumerate(all_rows, 1):
        model = models.diffusion[row.settings.model]
        t_row = time.perf_counter()
        samples = sample_row(row, model, models.gate, device, models.guide(row.settings))
        out = metrics.classify(models.classifier.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)
        m = row_metrics(samples, out, reference, floors[row.settings.n], cfg.k, device, K if row.settings.model == "mcl" else None)
        if reference2 is not None:
            out2 = metrics.classify(models.classifier2.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)
            m["second_classifier"] = second_classifier_metrics(samples, out2, reference2, floors2[row.settings.n])
        if inception is not None and table == "main":
            f = inception(samples.images, cfg.batch_size)
            mu, cov = metrics.feature_stats(f)
            m["fid_inception"] = metrics.frechet_from_stats(mu, cov, inc_mu, inc_cov)
        if row.group == "mcl" and row.settings.routing.startswith("expert:"):
            expert_preds[int(row.settings.routing.split(":")[1])] = out["preds"]
        rec = {
            "name": row.name,
            "group": row.group,
            "settings": row.settings.to_dict(),
            "batch_size": row.batch_size,
            "batches": [b.to_dict() for b in row.batches()],
            "images_sha256": images_sha256(samples.images),
            "nfe": nfe(row.settings.sampler, row.settings.steps),
            **({"expert_evals_per_step": routing_cost(row.settings.routing, K, models.diffusion["mcl"].shared)} if row.settings.model == "mcl" else {}),
            "sample_seconds": samples.seconds,
            "seconds": time.perf_counter() - t_row,
            "metrics": m,
        }
        (records if table == "main" else sweep_records).append(rec)
        log(f"[{i}/{len(all_rows)}] {row.name} ({row.settings.sampler}, {row.settings.steps} steps, n={row.settings.n}): "
            f"FD {m['frechet']:.4g} (floor {m['frechet_floor']:.4g}), sampling {samples.seconds:.1f} s, total {rec['seconds']:.1f} s")

    diagnosis = None
    if "mcl" in models.diffusion and cfg.diagnosis_n:
        t0 = time.perf_counter()
        test_x, test_y = load_mnist(cfg.data_dir, train=False)
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.diagnosis_n]
        diagnosis = mcl_diagnosis(models.diffusion["mcl"], test_x[pick], test_y[pick], cfg.diagnosis_levels, models.gate, cfg.seed, cfg.batch_size)
        log(f"MCL diagnosis on {cfg.diagnosis_n} test images at {cfg.diagnosis_levels} noise levels ({time.perf_counter() - t0:.1f} s):\n  "
            + "\n  ".join(specialisation_summary(diagnosis)))

    figures = {}
    if cfg.figures:
        t0 = time.perf_counter()
        figures = make_figures(cfg, models, records, sweep_records, floors, expert_preds, out_dir, device, log, diagnosis)
        log(f"figures: {len(figures)} written to {out_dir} ({time.perf_counter() - t0:.1f} s)")

    recorded = record_quality(records, models.paths, command) if cfg.record_quality else {}
    for name, row in recorded.items():
        log(f"recorded the quality of row {row!r} in {models.paths.get(name) or models.paths[f'guide {name}']}")

    results = {
        "format": "diffusion_core.evaluate/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "config": asdict(cfg),
        "environment": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(), "torch": torch.__version__, "python": platform.python_version()},
        "checkpoints": {k: {"path": p, "sha256": file_sha256(p)} for k, p in models.paths.items()},
        "reference": {"test_images": len(reference.test_features), "classifier_test_accuracy": reference.classifier_accuracy,
                      "classifier2_test_accuracy": None if reference2 is None else reference2.classifier_accuracy},
        "floors": {str(n): f for n, f in floors.items()},
        "inception": {"enabled": inception is not None, "note": inception_note},
        "rows": records,
        "sweep": sweep_records,
        "mcl_diagnosis": diagnosis,
        "figures": figures,
        "recorded_quality": recorded,
        "seconds": time.perf_counter() - t_all,
    }
    results = _finite(results)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    (out_dir / "results.md").write_text(results_markdown(results) + "\n")
    return results
