"""Table 1 in miniature: final test error per method and data set (section 5.5).

Paper: CIFAR-10/100 and SVHN, NIN, 200 epochs (CIFAR) -- NormProp 9.11% vs BN 9.41% test error
on CIFAR-10 without augmentation, 32.19 vs 35.32 on CIFAR-100, 1.88 vs 2.25 on SVHN. Here: three
bundled data sets, 30 epochs, batch size 50, lr 0.05 halved every 10 epochs for every method
(no per-method tuning), the un-normalised net included.
"""

from __future__ import annotations

import numpy as np

from . import common
from .loops import fit, make_model, seed_everything
from .metrics import t_interval
from .plotting import COLORS, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "table1"
TITLE = "6. Table 1 in miniature: final test error"
BATCH = 50
METHODS = (("NormProp", "normprop", 0.05), ("BatchNorm", "batchnorm", 0.05),
           ("LayerNorm", "layernorm", 0.05), ("none", "none", 0.05))
ARCH_NOTE = {"digits": "conv net (10 layers)", "mnist1d": "MLP 256-256-256",
             "segment": "MLP 128-128"}


def run(ctx: Context) -> str:
    sc = common.scale(ctx.quick)
    datasets = ["digits"] if ctx.quick else ["digits", "mnist1d", "segment"]
    errors, diverged = {}, {}
    bar = common.progress(len(datasets) * len(METHODS) * len(ctx.seeds) * sc.epochs, NAME)
    for dname in datasets:
        data = common.dataset(dname, ctx.quick)
        for label, norm, lr in METHODS:
            errs, div = [], 0
            for seed in ctx.seeds:
                gen = seed_everything(seed)
                h = fit(make_model(data, norm), data, sc.epochs, BATCH, lr, gen, sc.halve_every,
                        progress=bar)
                errs.append(100 * (1 - h.val_acc[-1]))
                div += h.diverged
            errors[dname, label, lr] = np.array(errs)
            diverged[dname, label, lr] = div
    bar.close()

    header = ["method", "lr"] + [f"{d} ({ARCH_NOTE[d]})" for d in datasets]
    rows = []
    for label, _, lr in METHODS:
        cells = []
        for d in datasets:
            cell = fmt_ci(*t_interval(errors[d, label, lr]))
            if diverged[d, label, lr]:
                cell += f" (diverged {diverged[d, label, lr]}/{len(ctx.seeds)})"
            cells.append(cell)
        rows.append([label, f"{lr:g}"] + cells)
    table = md_table(header, rows)

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(METHODS)
    for k, (label, _, lr) in enumerate(METHODS):
        m = np.array([t_interval(errors[d, label, lr]) for d in datasets])
        xs = np.arange(len(datasets)) + (k - (len(METHODS) - 1) / 2) * width
        ax.bar(xs, m[:, 0], width, yerr=np.nan_to_num(m[:, 1]), capsize=3, color=COLORS[label],
               alpha=1.0 if lr == 0.05 else 0.5, hatch=None if lr == 0.05 else "//",
               label=f"{label} (lr {lr:g})")
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(f"Final test error after {sc.epochs} epochs ({len(ctx.seeds)} seeds, 95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    path = save(fig, ctx.figures / "table1_test_error.png")
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n![table1]({path.parent.name}/{path.name})\n\n"
            f"Test error (%) after {sc.epochs} epochs, batch size {BATCH}, lr halved every "
            f"{sc.halve_every} epochs, weight decay 5e-4, momentum 0.9; mean ± 95% t-interval over "
            f"seeds. Data layer: batch data normalisation for every method.\n\n{table}\n")
