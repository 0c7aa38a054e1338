"""Figure 4: effect of the training batch size on NormProp, with BN beside it (section 5.4).

Paper: NormProp at several batch sizes including 1 ("using Global Data Normalization at data
layer"); "largely unaffected by batch size although lower batch sizes seem to yield better
performance". Learning rate: the paper's rule "larger initial learning rate for larger batch
size" with its two data points (0.05 at 50, 0.08 at 100), as square-root scaling
(:func:`benchmarks.experiments.loops.lr_for_batch`): 0.0071 at 1, 0.02 at 8, 0.04 at 32, 0.08 at
128. BN gets the same rates. At batch size 1 a BatchNorm1d layer refuses to train (one value per
channel); BatchNorm2d trains on a single image by normalising over its spatial positions, and
then validates with running averages of a different statistic -- we run it and show the result.
"""

from __future__ import annotations

import numpy as np
import torch

from . import common
from .loops import fit, lr_for_batch, make_model, pad_curve, seed_everything
from .metrics import t_interval
from .metrics import curve_interval
from .plotting import accuracy_axis, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "batch_size"
TITLE = "4. Batch size (paper fig. 4)"
NP_BATCHES = (1, 8, 32, 128)
BN_BATCHES = (1, 2, 8, 32, 128)
EPOCHS, HALVE = 12, 4


def bn_mlp_at_batch_one() -> str:
    """What a BatchNorm MLP says when asked to train on one sample."""
    from normprop import build_model, paper_optimizer, train_step

    net = build_model("mlp:16", 4, 3, norm="batchnorm")
    try:
        train_step(net, paper_optimizer(net, 0.01), torch.randn(1, 4), torch.tensor([0]))
    except Exception as e:  # noqa: BLE001 - we report whatever torch raises
        return f"{type(e).__name__}: {e}"
    return "trained (no error)"


def run(ctx: Context) -> str:
    epochs, halve = (2, 1) if ctx.quick else (EPOCHS, HALVE)
    data = common.dataset("digits", ctx.quick)
    configs = [("NormProp", "normprop", b) for b in NP_BATCHES] + \
              [("BatchNorm", "batchnorm", b) for b in BN_BATCHES]
    runs, diverged = {}, {}
    bar = common.progress(len(configs) * len(ctx.seeds) * epochs, NAME)
    for label, norm, bs in configs:
        curves, div = [], 0
        for seed in ctx.seeds:
            gen = seed_everything(seed)
            # Paper: batch size 1 with global data normalisation; batch data norm otherwise.
            model = make_model(data, norm, data_norm="global" if bs == 1 else "batch")
            h = fit(model, data, epochs, bs, lr_for_batch(bs), gen, halve, progress=bar)
            curves.append(pad_curve(h.val_acc, epochs + 1))
            div += h.diverged
        runs[label, bs] = 100 * np.array(curves)
        diverged[label, bs] = div
    bar.close()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = np.arange(1, epochs + 1)
    cmap = plt.get_cmap("viridis")
    for ax, (label, batches) in zip(axes, (("NormProp", NP_BATCHES), ("BatchNorm", BN_BATCHES))):
        for k, bs in enumerate(batches):
            r = runs[label, bs][:, 1:]
            m, h = curve_interval(r)
            ax.errorbar(x, m, yerr=np.nan_to_num(h), capsize=3, marker="o", markersize=3,
                        color=cmap(k / max(1, len(batches) - 1)),
                        label=f"batch {bs} (lr {lr_for_batch(bs):.3g})")
        ax.set_title(f"{label}, digits conv net")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("validation accuracy (%)")
    accuracy_axis(axes[0])
    fig.suptitle(f"Effect of training batch size ({len(ctx.seeds)} seeds, 95% CI)")
    path = save(fig, ctx.figures / "fig4_batch_size.png")

    rows = []
    for label, norm, bs in configs:
        r = runs[label, bs]
        rows.append([label, str(bs), f"{lr_for_batch(bs):.4g}",
                     "global" if bs == 1 else "batch", fmt_ci(*t_interval(r[:, -1])),
                     fmt_ci(*t_interval(r[:, 1:].max(axis=1))),
                     f"{diverged[label, bs]}/{len(ctx.seeds)}"])
    table = md_table(["method", "batch", "lr", "data layer", f"val. acc. epoch {epochs} (%)",
                      "best epoch (%)", "diverged"], rows)
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n![fig4]({path.parent.name}/{path.name})\n\n"
            f"Digits conv net, {epochs} epochs, lr halved every {halve}. "
            f"BatchNorm1d (an MLP) at batch size 1: `{bn_mlp_at_batch_one()}`. "
            f"BatchNorm2d (this conv net) at batch sizes 1 and 2 trains; its numbers are in "
            f"the table.\n\n{table}\n")
