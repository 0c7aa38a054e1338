"""Figure 1: global vs batch data normalisation for NormProp, at two batch sizes (section 5.1).

The paper: batch sizes 50 and 100 with initial learning rates 0.05 and 0.08, halved every 10
epochs; "the performance using both strategies is very similar for both batch sizes".
Here: the digits conv net and the MNIST-1D MLP, 30 epochs.
"""

from __future__ import annotations

import numpy as np

from . import common
from .loops import fit, lr_for_batch, make_model, pad_curve, seed_everything
from .metrics import t_interval
from .plotting import accuracy_axis, curve, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "data_norm"
TITLE = "1. Global vs batch data normalisation (paper fig. 1)"
BATCHES = (50, 100)
MODES = {"global": "global data norm", "batch": "batch data norm"}


def run(ctx: Context) -> str:
    datasets = ["digits"] if ctx.quick else ["digits", "mnist1d"]
    sc = common.scale(ctx.quick)
    runs, diverged = {}, {}
    bar = common.progress(len(datasets) * len(BATCHES) * len(MODES) * len(ctx.seeds) * sc.epochs, NAME)
    for dname in datasets:
        data = common.dataset(dname, ctx.quick)
        for bs in BATCHES:
            for mode in MODES:
                curves, div = [], 0
                for seed in ctx.seeds:
                    gen = seed_everything(seed)
                    model = make_model(data, "normprop", data_norm=mode)
                    h = fit(model, data, sc.epochs, bs, lr_for_batch(bs), gen, sc.halve_every,
                            progress=bar)
                    curves.append(pad_curve(h.val_acc, sc.epochs + 1))
                    div += h.diverged
                runs[dname, bs, mode] = np.array(curves)
                diverged[dname, bs, mode] = div
    bar.close()

    fig, axes = plt.subplots(len(datasets), len(BATCHES), figsize=(10, 3.6 * len(datasets)),
                             squeeze=False)
    epochs = np.arange(sc.epochs + 1)
    for i, dname in enumerate(datasets):
        for j, bs in enumerate(BATCHES):
            ax = axes[i, j]
            for mode, color in zip(MODES, ("#d62728", "#1f77b4")):
                div = diverged[dname, bs, mode]
                label = MODES[mode] + (f" ({div}/{len(ctx.seeds)} diverged)" if div else "")
                curve(ax, epochs[1:], 100 * runs[dname, bs, mode][:, 1:], label, color, caps=True)
            ax.set_title(f"{dname}: batch size {bs}, lr {lr_for_batch(bs):g}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation accuracy (%)")
            accuracy_axis(ax)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.suptitle(f"NormProp: global vs batch data normalisation ({len(ctx.seeds)} seeds, 95% CI)")
    path = save(fig, ctx.figures / "fig1_data_norm.png")

    rows = []
    for dname in datasets:
        for bs in BATCHES:
            for mode in MODES:
                r = runs[dname, bs, mode]
                rows.append([dname, str(bs), f"{lr_for_batch(bs):g}", MODES[mode],
                             fmt_ci(*t_interval(r[:, -1]), scale=100),
                             fmt_ci(*t_interval(r[:, 1:].max(axis=1)), scale=100),
                             f"{diverged[dname, bs, mode]}/{len(ctx.seeds)}"])
    table = md_table(["data", "batch", "lr", "data layer", "final val. acc. (%)",
                      "best epoch (%)", "diverged"], rows)
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n![fig1]({path.parent.name}/{path.name})\n\n"
            f"NormProp, {sc.epochs} epochs, lr halved every {sc.halve_every}; mean ± 95% t-interval "
            f"over seeds; a diverged run (loss not finite) stops and keeps its last accuracy "
            f"in the means.\n\n{table}\n")
