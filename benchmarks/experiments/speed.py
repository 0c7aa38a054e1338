"""Section 5.6: training speed, NormProp vs BN on the same net and data.

Paper: one CIFAR-10 epoch of the NIN on a GTX Titan X, NormProp ~84 s, BN ~96 s (0.875x),
"since there is no need for estimating the running average values of input mean and standard
deviation for hidden layers". Here: CPU, one thread, the digits conv net and the MNIST-1D MLP at
batch size 50 (the paper's protocol) and the digits conv net at batch size 1 is left out (BN
cannot be compared there). Methods are interleaved epoch by epoch so that load from other jobs
on the shared machine hits both alike; the ratio's interval is over paired epochs (log scale).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from normprop import paper_optimizer

from . import common
from .loops import make_model, seed_everything, train_epoch
from .metrics import ratio_interval, t_interval
from .plotting import COLORS, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "speed"
TITLE = "5. Training speed (paper section 5.6)"
BATCH, LR = 50, 0.05
METHODS = (("NormProp", "normprop"), ("BatchNorm", "batchnorm"), ("LayerNorm", "layernorm"),
           ("none", "none"))


def run(ctx: Context) -> str:
    datasets = ["digits"] if ctx.quick else ["digits", "mnist1d"]
    reps = 2 if ctx.quick else 5  # timed epochs per seed, after one warm-up epoch
    times: dict[tuple[str, str], list[float]] = {}
    bar = common.progress(len(datasets) * len(ctx.seeds) * (reps + 1) * len(METHODS), NAME)
    for dname in datasets:
        data = common.dataset(dname, ctx.quick)
        for seed in ctx.seeds:
            models, opts, gens = {}, {}, {}
            for label, norm in METHODS:
                gens[label] = seed_everything(seed)
                models[label] = make_model(data, norm)
                opts[label] = paper_optimizer(models[label], LR)
            for rep in range(reps + 1):
                for label, _ in METHODS:
                    t0 = time.perf_counter()
                    train_epoch(models[label], opts[label], data.x_train, data.y_train, BATCH,
                                gens[label])
                    dt = time.perf_counter() - t0
                    if rep > 0:  # the first epoch warms allocator and caches
                        times.setdefault((dname, label), []).append(dt)
                    bar.update(1)
    bar.close()

    rows = []
    ratios = {}
    for dname in datasets:
        n = len(common.dataset(dname, ctx.quick).y_train)
        bn = times[dname, "BatchNorm"]
        for label, _ in METHODS:
            t = times[dname, label]
            r, lo, hi = ratio_interval(t, bn)
            ratios[dname, label] = (r, lo, hi)
            rows.append([dname, label, fmt_ci(*t_interval(t), digits=3),
                         f"{n / np.mean(t):,.0f}", f"{r:.3f} [{lo:.3f}, {hi:.3f}]"])
    table = md_table(["data", "method", "s / epoch", "samples / s", "time ratio to BN [95% CI]"],
                     rows)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(METHODS)
    for k, (label, _) in enumerate(METHODS):
        r = np.array([ratios[d, label] for d in datasets])
        xs = np.arange(len(datasets)) + (k - (len(METHODS) - 1) / 2) * width
        ax.bar(xs, r[:, 0], width, color=COLORS[label], label=label,
               yerr=np.abs(np.stack([r[:, 0] - r[:, 1], r[:, 2] - r[:, 0]])), capsize=3)
    ax.axhline(1.0, color="black", lw=0.6)
    ax.axhline(84 / 96, color="#d62728", lw=0.8, ls="--", label="paper NormProp/BN (GPU) 0.875")
    ax.set_xticks(np.arange(len(datasets)), [f"{d} (batch {BATCH})" for d in datasets])
    ax.set_ylabel("time per epoch / BatchNorm's")
    ax.set_title(f"Training time per epoch relative to BN (CPU, 1 thread, 95% CI)")
    top = max([v[2] for v in ratios.values() if v[2] == v[2]] + [1.0])
    ax.set_ylim(0, 1.35 * max(top, 1.0))
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    path = save(fig, ctx.figures / "speed.png")
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n![speed]({path.parent.name}/{path.name})\n\n"
            f"Batch size {BATCH}; {reps} timed epochs per seed after one warm-up, methods "
            f"interleaved; torch on {torch.get_num_threads()} CPU thread(s). Paper: NormProp "
            f"84 s vs BN 96 s per CIFAR-10 epoch on a GPU (ratio 0.875). No GPU was available "
            f"for this run.\n\n{table}\n")
