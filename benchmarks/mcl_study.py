"""The MCL study at equal CPU budget: every arm's checkpoint through the same evaluation, one table.

    python benchmarks/mcl_study.py                       # the arms of docs/mcl.md, trained into runs/study/<arm>/
    python benchmarks/mcl_study.py --arms k1,example-hard --n 200   # a subset, fewer samples

Each arm is one ``train/mcl.py`` run (commands in ``ARMS`` and in docs/mcl.md) that wrote
``runs/study/<arm>/mcl.safetensors`` and its ``metrics.jsonl``. For each, this script runs
``diffusion_core.evaluate`` on that checkpoint (DPM-Solver++ 2M, 16 steps, ``--n`` samples a row,
both classifiers, the MCL diagnosis on 1000 test images) into ``<out>/<arm>/``, and collects:

* training: images/s of the run's epochs, images seen, minutes, the experts' shares of wins (and,
  for per-example winners, of the data);
* each expert alone: the digits it draws most and its share of confident samples;
* every routing: FD over the real-data floor, class entropy and confidence, under both classifiers;
* the score head (or gating network) per noise level: accuracy and cross-entropy against the
  winner it was trained for, beside a predictor that sees only the noise level.

It writes ``<out>/study.json`` and ``<out>/study.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from diffusion_core.evaluate.config import EvalConfig
from diffusion_core.evaluate.run import evaluate
from diffusion_core.guidance import AUTOGUIDE_OF
from diffusion_core.models import load_model

ROOT = Path(__file__).resolve().parent.parent

# The arms. Full budget: the K=1 baseline, the separate ensemble and train/mcl.py's default, each
# given the same CPU time (the step counts follow the images/s of train/benchmark_loop.py: 175 for
# one model, 131 for the shared default, 60 for separate experts). Half budget, to compare the WTA
# variants and the scope: four runs stopped after the first 468 steps of the same 2-epoch schedule,
# against the default run's snapshot at that step.
SHARED = "python train/mcl.py --mcl-arch shared --wta-scope example --wta hard --epochs 2"  # mcl_shared's recipe
ARMS = {
    "k1": dict(what="K=1 baseline: the same network with one head", routings=("expert:0",),
               command="python train/mcl.py --mcl-arch shared --experts 1 --wta-scope step --epochs 3 --max-steps 1250"),
    "separate": dict(what="5 separate UNets, annealed WTA per step (the earlier formulation)",
                     command="python train/mcl.py --epochs 1 --max-steps 430"),
    "example-hard": dict(what="shared trunk, per-example winners, hard WTA (the shipped mcl_shared)",
                         command=SHARED + " --snapshot-every 468"),
    "example-hard@468": dict(what="the default run at step 468 (its snapshot)", run="example-hard", upto=468,
                             checkpoint="snapshots/mcl_step0000468.safetensors", command="(the snapshot of example-hard)"),
    "example-relaxed@468": dict(what="per-example winners, relaxed WTA (eps 0.05)", run="example-relaxed",
                                command=SHARED.replace("hard", "relaxed") + " --stop-at 468"),
    "example-annealed@468": dict(what="per-example winners, annealed WTA", run="example-annealed",
                                 command=SHARED.replace("hard", "annealed") + " --stop-at 468"),
    "step-annealed@468": dict(what="shared trunk, winners per noisy example, annealed WTA", run="step-annealed",
                              command="python train/mcl.py --mcl-arch shared --wta-scope step --wta annealed --epochs 2 --stop-at 468"),
    # train/mcl.py's default (6 epochs, mcl_parts) and the K=1 model given the same CPU time (3,760 steps:
    # 2,814 x 175 / 131), run one at a time on the whole machine, under --runs runs
    "parts": dict(what="train/mcl.py's default (mcl_parts): shared trunk, per-image winners, hard WTA, 6 epochs", run="mcl_parts",
                  command="python train/mcl.py --snapshot-every 938"),
    "k1-parts": dict(what="K=1 baseline at parts' CPU time", run="mcl_k1", routings=("expert:0",),
                     command="python train/mcl.py --experts 1 --wta-scope step --name mcl_k1 --epochs 9 --max-steps 3760"),
    # the default with hypotheses that own only the output convolution (everything else shared), at
    # the default's steps: does a head that sees only its part of the data hold MCL back?
    "parts-head0": dict(what="train/mcl.py's default with --head-blocks 0: each hypothesis owns only the output convolution", run="mcl_parts_hb0",
                        command="python train/mcl.py --head-blocks 0 --name mcl_parts_hb0 --snapshot-every 938"),
}
MCL_ROUTINGS = ("experts", "sampled", "winrate", "pooled", "soft", "gated")
CLASSIFIERS = ("classifier", "classifier2")


def arm_dir(runs: Path, arm: str) -> Path:
    return runs / ARMS[arm].get("run", arm)


def arm_checkpoint(runs: Path, arm: str) -> Path:
    return arm_dir(runs, arm) / ARMS[arm].get("checkpoint", "mcl.safetensors")


def training_summary(run: Path, upto: int | None = None, checkpoint: Path | None = None) -> dict:
    """The run's epochs from its metrics.jsonl; where that is gone (a run folder rebuilt from a
    shipped checkpoint) the totals and the last epoch record the checkpoint's config keeps."""
    if not (run / "metrics.jsonl").is_file() and upto is None and checkpoint is not None:
        t = load_model(checkpoint).config.get("training") or {}
        last = t.get("final") or {}
        out = {"epochs": t.get("epochs"), "steps": t.get("steps"), "train_minutes": round(t["train_time_s"] / 60, 1),
               "images_per_s": round(t["images_seen"] / t["train_time_s"], 1), "win_rates": last.get("win_rates"),
               "owned_rates": last.get("owned_rates"), "source": "checkpoint config (no metrics.jsonl)"}
        out.update({k: round(last[k], 4) for k in ("score_accuracy", "score_ce", "denoise_loss") if k in last})
        return out
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' in line]
    epochs = [r for r in epochs if upto is None or r["step"] <= upto]
    last = epochs[-1]
    seconds = sum(r["seconds"] for r in epochs)
    images = sum(r["images_per_s"] * r["seconds"] for r in epochs)
    out = {"epochs": len(epochs), "steps": last["step"], "train_minutes": round(seconds / 60, 1), "images_per_s": round(images / seconds, 1),
           "win_rates": last.get("win_rates"), "owned_rates": last.get("owned_rates")}
    for k in ("score_accuracy", "score_ce", "denoise_loss"):
        if k in last:
            out[k] = round(last[k], 4)
    return out


def row_key(settings: dict, n: int, seed: int = 0) -> str:
    """A row's name in study.json: its routing, autoguidance, sample count (when not 1000) and seed (when not 0)."""
    key = settings["routing"] + (f" ag={settings['autoguidance']:g}" if settings.get("autoguidance", 1) != 1 else "")
    key += " of mixture" if settings.get("autoguide") == "mixture" else ""
    key = key if n == 1000 else f"{key} (n={n})"  # rows at other sample counts kept apart
    return key if seed == 0 else f"{key} seed {seed}"


def evaluate_arm(arm: str, runs: Path, out: Path, n: int, checkpoints: Path, device: str, routings=None, diagnosis_n: int = 1000,
                 autoguidance: tuple[float, ...] = (), ag_routings: tuple[str, ...] = (), autoguide: str = "output", seed: int = 0) -> dict:
    ckpt = arm_checkpoint(runs, arm)
    if not ckpt.is_file():
        raise SystemExit(f"error: {ckpt} is missing; train the arm first: {ARMS[arm]['command']} --run-dir {arm_dir(runs, arm)} --out {ckpt}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in CLASSIFIERS + (("ddpm_weak",) if autoguidance else ()):  # ddpm_weak: autoguidance's guide
            (d / f"{name}.safetensors").symlink_to((checkpoints / f"{name}.safetensors").resolve())
        (d / "mcl.safetensors").symlink_to(ckpt.resolve())
        routings = ARMS[arm].get("routings") or routings or MCL_ROUTINGS
        routings = () if tuple(routings) == ("none",) else routings  # only the autoguidance rows (of --ag-routings)
        cfg = EvalConfig(models=("mcl",), routings=routings, n=n, sweep_n=0, diagnosis_n=diagnosis_n, checkpoint_dir=str(d),
                         out_dir=str(out / arm if seed == 0 else out / arm / f"seed{seed}"), figures=False, device=device, batch_size=100, autoguidance=tuple(autoguidance),
                         autoguidance_routings=tuple(ag_routings), autoguide=autoguide, seed=seed)
        command = f"python benchmarks/mcl_study.py --arms {arm} --n {n} --routings {','.join(routings) or 'none'} --diagnosis-n {diagnosis_n}"
        command += f" --autoguidance {','.join(f'{w:g}' for w in autoguidance)}" if autoguidance else ""
        command += f" --ag-routings {','.join(ag_routings)}" if autoguidance and ag_routings else ""
        command += f" --autoguide {autoguide}" if autoguidance and autoguide != "output" else ""
        command += f" --seeds {seed}" if seed else ""
        results = evaluate(cfg.validate(), command=command)
    rows = {}
    for r in results["rows"]:
        m = r["metrics"]
        m2 = m.get("second_classifier") or {}
        hist = m["histogram"]
        top = sorted(range(10), key=lambda c: -hist[c])[:3]
        rows[row_key(r["settings"], n, seed)] = {
            "fd_ratio": round(m["frechet_ratio"], 3), "entropy": round(m["entropy"], 4), "confident": round(m["confident"], 4),
            "fd_ratio_2": round(m2.get("frechet_ratio", float("nan")), 3), "entropy_2": round(m2.get("entropy", float("nan")), 4),
            "confident_2": round(m2.get("confident", float("nan")), 4), "modes": m["modes_covered"], "seed": seed,
            "top_digits": [(c, round(hist[c] / max(sum(hist), 1), 3)) for c in top], "seconds": round(r["sample_seconds"], 1), "n": n}
    diag = results.get("mcl_diagnosis") or {}
    score = diag.get("score_vs_owner") or diag.get("gate")
    return {"arm": arm, "n": n, "what": ARMS[arm]["what"], "command": ARMS[arm]["command"],
            "training": training_summary(arm_dir(runs, arm), ARMS[arm].get("upto"), ckpt), "rows": rows,
            "diagnosis_sigmas": diag.get("sigmas"), "score": score, "score_target": "owner" if diag.get("score_vs_owner") else "winner",
            "owner_share_by_digit": diag.get("owner_share_by_digit"), "winner_share_by_digit": diag.get("winner_share_by_digit")}


def _f(v, spec=".2f"):
    return "–" if v is None or v != v else format(v, spec)


def study_markdown(arms: list[dict], n: int) -> str:
    lines = [f"Every arm evaluated with DPM-Solver++ 2M, 16 steps, {n} samples a row (unless its row says otherwise), seed 0. FD is over the real-data floor in "
             "each classifier's feature space (classifier / classifier2).", "",
             "| arm | images/s | images seen | minutes | samples | routing | FD/floor | entropy | conf>0.9 |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for a in arms:
        t = a["training"]
        seen = t["steps"] * 128
        for i, (routing, r) in enumerate((k, v) for k, v in a["rows"].items() if not k.startswith("expert:") or a["arm"].startswith("k1")):
            head = f"| {a['arm']} | {t['images_per_s']:.0f} | {seen:,} | {t['train_minutes']:.1f} |" if i == 0 else "| | | | |"
            head += f" {r.get('n', a.get('n', n))} |"
            lines.append(f"{head} {routing} | {_f(r['fd_ratio'])} / {_f(r['fd_ratio_2'])} | {_f(r['entropy'], '.3f')} / {_f(r['entropy_2'], '.3f')} "
                         f"| {_f(r['confident'], '.3f')} / {_f(r['confident_2'], '.3f')} |")
    lines += seeds_markdown(arms)
    lines += ["", "Each expert alone (classifier): its three most drawn digits (share of its samples) and its confident share; "
              "the experts' shares of training wins (per step) and of the data (per example).", "",
              "| arm | expert | digits it draws | conf>0.9 | FD/floor | share of wins | share of data |", "|---|---:|---|---:|---:|---:|---:|"]
    for a in arms:
        if a["arm"].startswith("k1"):
            continue
        t = a["training"]
        for k in range(len(t["win_rates"] or [])):
            r = a["rows"].get(f"expert:{k}")
            if r is None:
                continue
            digits = ", ".join(f"{c} ({s:.0%})" for c, s in r["top_digits"])
            owned = (t.get("owned_rates") or [None] * 10)[k]
            lines.append(f"| {a['arm']} | {k} | {digits} | {_f(r['confident'], '.3f')} | {_f(r['fd_ratio'])} | {_f(t['win_rates'][k], '.3f')} | {_f(owned, '.3f')} |")
    lines += ["", "Score head (shared arms) or gating network per noise level, against the winner it was trained for: accuracy and "
              "cross-entropy (nats), and in brackets a predictor that sees only the noise level.", ""]
    for a in arms:
        s = a.get("score")
        if not s or a["arm"].startswith("k1"):
            continue
        lines += [f"{a['arm']} (target: {a['score_target']}):", "", "| sigma | accuracy (noise only) | cross-entropy (noise only) |", "|---:|---:|---:|"]
        for i, sig in enumerate(a["diagnosis_sigmas"]):
            lines.append(f"| {sig:.3g} | {s['accuracy'][i]:.3f} ({s['majority'][i]:.3f}) | {s['cross_entropy'][i]:.3f} ({s['majority_ce'][i]:.3f}) |")
        lines.append("")
    return "\n".join(lines)


def seed_groups(rows: dict) -> dict[str, list[dict]]:
    """The rows sampled at several seeds, by their name at seed 0: name -> [row of each seed], seed order."""
    groups: dict[str, list[dict]] = {}
    for key, r in rows.items():
        groups.setdefault(key.rsplit(" seed ", 1)[0], []).append(r)  # row_key's suffix, when there is one
    return {k: sorted(v, key=lambda r: r.get("seed", 0)) for k, v in groups.items() if len(v) > 1}


def _mean_range(rows: list[dict], name: str, spec: str = ".2f") -> str:
    """'mean (lowest-highest)' of one metric over rows, leaving out NaN."""
    v = [r[name] for r in rows if r.get(name) == r.get(name)]
    return f"{_f(sum(v) / len(v), spec)} ({_f(min(v), spec)}-{_f(max(v), spec)})" if v else "–"


def seeds_markdown(arms: list[dict]) -> list[str]:
    """One line per row sampled at several seeds: the mean and range of each metric over them."""
    lines = []
    for a in arms:
        for base, rs in seed_groups(a["rows"]).items():
            seeds = ",".join(str(r.get("seed", 0)) for r in rs)
            lines.append(f"| {a['arm']} | {base} | {seeds} | {_mean_range(rs, 'fd_ratio')} | {_mean_range(rs, 'fd_ratio_2')} "
                         f"| {_mean_range(rs, 'entropy', '.3f')} | {_mean_range(rs, 'confident', '.3f')} / {_mean_range(rs, 'confident_2', '.3f')} |")
    if not lines:
        return []
    return ["", "Rows sampled at several seeds: the mean over the seeds (lowest-highest).", "",
            "| arm | row | seeds | FD/floor | FD/floor, classifier2 | entropy | conf>0.9 (classifier / classifier2) |",
            "|---|---|---|---:|---:|---:|---:|", *lines]


def score_trajectories(model_path: Path, png: Path, routing: str = "sampled", seeds=(0, 1, 2, 3), steps: int = 32) -> dict:
    """The score head's probabilities against the noise level along a few trajectories (one panel
    each, the final digit beside it), with the expert that served each step as dots; returns the
    numbers plotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from diffusion_core.models import load_model
    from diffusion_core.palette import expert_color
    from diffusion_core.pipeline import Settings, to_uint8, trajectory

    model = load_model(model_path)
    fig = Figure(figsize=(11, 2.4 * len(seeds)), dpi=90, layout="constrained")
    axes = fig.subplots(len(seeds), 2, squeeze=False, width_ratios=[6, 1])
    data = []
    for row, seed in enumerate(seeds):
        s = Settings(model=str(model_path), routing=routing, steps=steps, seed=seed, n=1)
        sig, probs, experts, last = [], [], [], None
        for step in trajectory(s, model, model.score_gate()):
            sig.append(step.sigma)
            probs.append(step.gate_probs[0].tolist())
            experts.append(int(step.expert[0]))
            last = step.x
        ax = axes[row, 0]
        for k in range(model.num_experts):
            ax.plot(sig, [p[k] for p in probs], color=expert_color(k), lw=2, label=f"expert {k}")
        ax.scatter(sig, [1.04] * len(sig), c=[expert_color(e) for e in experts], s=18, clip_on=False)
        ax.set_xscale("log")
        ax.set_xlim(max(sig), min(sig))
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("score head p(k)")
        ax.set_title(f"seed {seed}: dots = the expert {routing} routing drew at each step", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        axes[row, 1].imshow(to_uint8(last)[0].numpy(), cmap="gray", vmin=0, vmax=255)
        axes[row, 1].axis("off")
        data.append({"seed": seed, "sigma": sig, "probs": probs, "experts": experts})
    axes[-1, 0].set_xlabel("noise level sigma (falls from left to right)")
    axes[0, 0].legend(fontsize=7, ncol=model.num_experts, loc="upper left", bbox_to_anchor=(0, 1.45), frameon=False)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return {"routing": routing, "steps": steps, "trajectories": data}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--runs", default="runs/study", help="where the arms' run folders are")
    p.add_argument("--out", default="assets/mcl_study", help="where study.json, study.md and each arm's evaluation go")
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--routings", default=None, help="comma-separated MCL routings of the K=5 arms (default: "
                   + ",".join(MCL_ROUTINGS) + "; none: only the autoguidance rows)")
    p.add_argument("--diagnosis-n", type=int, default=1000, help="test images in the MCL diagnosis (the score head per noise level; 0: none)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder with classifier and classifier2 (and ddpm_weak, for --autoguidance)")
    p.add_argument("--autoguidance", default="", help="comma-separated autoguidance weights (guide ddpm_weak) for extra rows of the default routing")
    p.add_argument("--autoguide", choices=AUTOGUIDE_OF, default="output",
                   help="those rows compare the guide with the output, or with the experts' mixture (guidance.AutoguidanceDenoiser)")
    p.add_argument("--ag-routings", default="", help="comma-separated routings of those autoguidance rows (default: the default routing)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: each row sampled once per seed (its reference "
                   "subset and floor drawn from the same seed); rows of seed s > 0 are named '... seed s'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--figure", default=None, metavar="ARM", help="also draw the score head along four trajectories of this arm "
                   "(<out>/fig_score_trajectories.png); with --arms '' only the figure")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {bad}; expected some of {', '.join(ARMS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or min(seeds) < 0:
        p.error(f"--seeds must name at least one non-negative seed, got {args.seeds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "study.json").read_text())["arms"] if (out / "study.json").is_file() else []
    done = {a["arm"]: a for a in previous}
    for arm in arms:
        routings = tuple(r for r in args.routings.split(",") if r) if args.routings else None
        ag = tuple(float(w) for w in args.autoguidance.split(",") if w.strip())
        agr = tuple(r for r in args.ag_routings.split(",") if r.strip())
        for i, seed in enumerate(seeds):
            new = evaluate_arm(arm, Path(args.runs), out / f"n{args.n}", args.n, Path(args.checkpoints), args.device, routings,
                               args.diagnosis_n if i == 0 else 0, ag, agr, args.autoguide, seed)
            if arm in done:  # another call's rows (other routings, sample counts or seeds) are kept
                new["rows"] = {**done[arm]["rows"], **new["rows"]}
                if new["score"] is None:  # a call without the diagnosis keeps the earlier one
                    for k in ("score", "score_target", "diagnosis_sigmas", "owner_share_by_digit", "winner_share_by_digit"):
                        new[k] = done[arm].get(k)
            done[arm] = new
        print(f"{arm}: " + ", ".join(f"{k} {v['fd_ratio']:.2f}x/{v['entropy']:.3f}" for k, v in done[arm]["rows"].items()), flush=True)
        (out / "study.json").write_text(json.dumps({"arms": [done[a] for a in ARMS if a in done]}, indent=1) + "\n")  # after each arm
    if args.figure:
        traj = score_trajectories(arm_checkpoint(Path(args.runs), args.figure), out / "fig_score_trajectories.png")
        (out / "score_trajectories.json").write_text(json.dumps(dict(traj, arm=args.figure)) + "\n")
        print(f"wrote {out / 'fig_score_trajectories.png'}")
    ordered = [done[a] for a in ARMS if a in done]
    command = "python benchmarks/mcl_study.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    (out / "study.json").write_text(json.dumps({"command": command, "n": args.n, "arms": ordered}, indent=1) + "\n")
    (out / "study.md").write_text(study_markdown(ordered, args.n) + "\n")
    print((out / "study.md").read_text())


if __name__ == "__main__":
    main()
