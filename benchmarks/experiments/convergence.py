"""Figure 3: convergence stability -- validation accuracy per epoch, NormProp vs BN (5.3).

Paper: batch size 50, learning rate 0.05; "NormProp achieves a more stable convergence in
general, but especially during initial training", because BN validates with running averages of
hidden statistics that lag the changing weights, while NormProp validates with the training
function itself. Stability numbers reported: the mean absolute epoch-to-epoch change of the
validation accuracy and the spread across seeds, over the first third of training.
"""

from __future__ import annotations

import numpy as np

from . import common
from .loops import fit, make_model, pad_curve, seed_everything
from .metrics import t_interval
from .plotting import accuracy_axis, COLORS, curve, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "convergence"
TITLE = "3. Convergence stability (paper fig. 3)"
BATCH, LR = 50, 0.05
METHODS = (("NormProp", "normprop"), ("BatchNorm", "batchnorm"))


def run(ctx: Context) -> str:
    sc = common.scale(ctx.quick)
    datasets = ["digits"] if ctx.quick else ["digits", "mnist1d"]
    runs = {}
    bar = common.progress(len(datasets) * len(METHODS) * len(ctx.seeds) * sc.epochs, NAME)
    for dname in datasets:
        data = common.dataset(dname, ctx.quick)
        for label, norm in METHODS:
            curves = []
            for seed in ctx.seeds:
                gen = seed_everything(seed)
                h = fit(make_model(data, norm), data, sc.epochs, BATCH, LR, gen, sc.halve_every,
                        progress=bar)
                curves.append(pad_curve(h.val_acc, sc.epochs + 1))
            runs[dname, label] = 100 * np.array(curves)
    bar.close()

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    epochs = np.arange(sc.epochs + 1)
    for ax, dname in zip(axes[0], datasets):
        for label, _ in METHODS:
            curve(ax, epochs[1:], runs[dname, label][:, 1:], label, COLORS[label], caps=True)
        ax.set_title(f"{dname}: batch size {BATCH}, lr {LR}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        accuracy_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"Convergence stability, NormProp vs BatchNorm ({len(ctx.seeds)} seeds, 95% CI)")
    path = save(fig, ctx.figures / "fig3_convergence.png")

    early = max(2, sc.epochs // 3)
    rows = []
    for dname in datasets:
        for label, _ in METHODS:
            r = runs[dname, label]
            jumps = np.abs(np.diff(r[:, 1:early + 1], axis=1)).mean(axis=1)
            spread = r[:, 1:early + 1].std(axis=0, ddof=1).mean() if r.shape[0] > 1 else float("nan")
            rows.append([dname, label, fmt_ci(*t_interval(r[:, 1])),
                         fmt_ci(*t_interval(r[:, early])), fmt_ci(*t_interval(r[:, -1])),
                         fmt_ci(*t_interval(jumps)), f"{spread:.2f}"])
    table = md_table(["data", "method", "val. acc. epoch 1 (%)", f"epoch {early} (%)",
                      f"epoch {sc.epochs} (%)",
                      f"mean abs(epoch-to-epoch change), epochs 1-{early} (pp)",
                      f"seed spread (sd, pp), epochs 1-{early}"], rows)
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n![fig3]({path.parent.name}/{path.name})\n\n"
            f"Batch size {BATCH}, lr {LR} halved every {sc.halve_every} epochs, {sc.epochs} epochs; "
            f"the digits conv net and the MNIST-1D MLP. Validation = test split, eval mode.\n\n"
            f"{table}\n")
