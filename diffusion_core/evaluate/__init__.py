"""Evaluation: the metrics table and the MCL analysis figures from one command.

Modules: ``config`` (configuration and rows), ``sampling`` (loading, seeded batches), ``reference``
(real data and the floor, InceptionV3), ``scores`` (a row's metrics), ``diagnosis`` (MCL),
``figures`` (every plot), ``report`` (table, results.md, ``record_quality``), ``run`` (the whole
evaluation) and ``cli`` (the command line).

    python -m diffusion_core.evaluate                       # full run (GPU; 10,000 samples per row)
    python -m diffusion_core.evaluate --quick --device cpu  # small n, minutes on a CPU
    python -m diffusion_core.evaluate --models mcl --routings experts,gated --n 2000

Rows of the main table (one sampler, one step count): ``ddpm``; ``cfg g=<scale>`` and ``flow g=<scale>`` for
each guidance scale; ``mcl expert_0`` .. ``mcl expert_{K-1}``, ``mcl heuristic``, ``mcl gated``,
``mcl soft``, ``mcl pooled``, ``mcl sampled``, ``mcl winrate``, ``mcl x0gate``, ``mcl scout``,
``mcl sticky`` (every routing of ``mcl.ROUTINGS``, each with its ``expert_evals_per_step``). A
second table, the sampler sweep, runs one model with every sampler
at several step counts (the quality-against-NFE figure).

For every row the samples (quantized to uint8, as a user sees them) are classified by the shipped
``classifier`` checkpoint, and in its feature space we report:

* Frechet distance against the whole MNIST test set, beside the *floor*: the same distance for
  ``n`` real training images (``n`` = the row's sample count, so the small-sample bias matches),
  and the ratio of the two;
* improved precision and recall (Kynkaanniemi et al. 2019, k=3) against ``n`` test images;
* class accuracy (requested digit vs prediction) for class-conditional rows, the class
  histogram, its normalized entropy, the fraction classified with confidence > 0.9 and the mode
  coverage (digits holding at least 1% of the samples);
* NFE (denoiser evaluations per sample), wall time, and for MCL rows the share of denoiser
  evaluations served by each expert.

Rows are sampled in batches of ``--batch-size``: batch ``i`` is ``pipeline.generate`` with the
row's settings, ``n`` = the batch size and ``seed`` = ``--seed + i``. ``results.json`` lists
these settings per row (``batches``) with a SHA-256 of the row's images, so any row can be
regenerated (``Settings.from_dict(b)`` for each batch) and checked. All rows share the same seeds,
so they start from the same noise.

Figures (PNG) in ``--out-dir``: trajectories per routing, the gated router's expert usage over the
noise level, digit histograms per expert, quality against NFE per sampler, and CFG guidance
against accuracy and Frechet distance.

MCL diagnosis (``--diagnosis-n`` MNIST test images, ``--diagnosis-levels`` noise levels; in
results.json under ``mcl_diagnosis`` and in results.md): each image is noised at every level and
the expert with the smallest error on the clean image wins it. Reported: the experts' shares of
wins and the winner's entropy per level, the shares per digit per level, the gate's mean
probabilities, their entropy and how often the gate picks the winner, and one sentence per expert
on what it specialises in (``specialisation_summary``). Figures ``fig_gate_sigma.png`` (wins,
gate probabilities and entropies against sigma) and ``fig_winner_digits.png`` (digit x expert
heatmap per level). Colours of experts come from ``diffusion_core.palette``.

``--fid-inception`` adds an InceptionV3 FID column, only if torchvision's ``inception_v3``
weights are already in the local torch hub cache; nothing is ever downloaded.
"""
