"""Figure 2: internal covariate shift -- the input distribution of one hidden unit per layer.

Section 5.2: "After every training epoch, we record the mean of the input distribution (over the
validation set) to a single randomly chosen (but fixed) unit in each hidden layer", batch size
50, learning rate 0.05 for NormProp and BN and 0.0001 for the un-normalised net ("larger learning
rates cause divergence"). Paper: on average the final means are closer to zero for NormProp
(0.19) than for BN (0.33).

"Input" is what :func:`normprop.layer_input_stats` reports: ``W_i x / ||W_i||`` for NormProp,
the normaliser's output before its affine for BN, the pre-activation for the plain net. The unit
is drawn once per seed (the same index for every method); we also report the average over all
units, which does not depend on the draw.
"""

from __future__ import annotations

import numpy as np
import torch

from normprop import layer_input_stats

from . import common
from .loops import fit, make_model, seed_everything
from .metrics import t_interval
from .plotting import COLORS, curve, plt, save
from .report import Context, fmt_ci, md_table, stamp

NAME = "covariate_shift"
TITLE = "2. Internal covariate shift (paper fig. 2)"
BATCH = 50
#: (label, norm, learning rate). The paper had to drop the plain net's rate to 0.0001; this
#: small net trains without normalisation at the same 0.05 in every seed (a probe of 0.05, 0.01,
#: 0.005 and 0.001 over 10 epochs: none diverged, and 0.05 learnt best), so all three share it.
METHODS = (("NormProp", "normprop", 0.05), ("BatchNorm", "batchnorm", 0.05), ("none", "none", 0.05))


def run(ctx: Context) -> str:
    sc = common.scale(ctx.quick)
    data = common.dataset("digits", ctx.quick)
    x_val = data.x_test
    means, stds, allmean, accs = {}, {}, {}, {}
    bar = common.progress(len(METHODS) * len(ctx.seeds) * sc.epochs, NAME)
    for label, norm, lr in METHODS:
        m_runs, s_runs, a_runs, acc_runs = [], [], [], []
        for seed in ctx.seeds:
            gen = seed_everything(seed)
            model = make_model(data, norm)
            n_layers = len(layer_input_stats(model.eval(), x_val[:2]))
            probe_rng = np.random.default_rng(1000 + seed)
            sizes = [s.mean.numel() for s in layer_input_stats(model.eval(), x_val[:2])]
            units = [int(probe_rng.integers(n)) for n in sizes]

            def record(model: torch.nn.Module, epoch: int) -> tuple[list, list, list]:
                model.eval()
                stats = layer_input_stats(model, x_val)
                return ([float(s.mean[u]) for s, u in zip(stats, units)],
                        [float(s.std[u]) for s, u in zip(stats, units)],
                        [float(s.mean.abs().mean()) for s in stats])

            h = fit(model, data, sc.epochs, BATCH, lr, gen, sc.halve_every, on_epoch=record,
                    progress=bar)
            rec = h.extra + [h.extra[-1]] * (sc.epochs + 1 - len(h.extra))
            m_runs.append([r[0] for r in rec])
            s_runs.append([r[1] for r in rec])
            a_runs.append([r[2] for r in rec])
            acc_runs.append(h.val_acc[-1])
            assert n_layers == len(units)
        means[label] = np.array(m_runs)      # (seeds, epochs+1, layers)
        stds[label] = np.array(s_runs)
        allmean[label] = np.array(a_runs)
        accs[label] = np.array(acc_runs)
    bar.close()

    n_layers = means["NormProp"].shape[2]
    epochs = np.arange(sc.epochs + 1)
    paths = []
    for what, store, fname in (("mean", means, "fig2_covariate_shift_mean.png"),
                               ("std", stds, "fig2_covariate_shift_std.png")):
        cols = 3
        rows = -(-n_layers // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for layer in range(n_layers):
            ax = axes[layer // cols, layer % cols]
            for label, _, lr in METHODS:
                # From epoch 1: at epoch 0 the data layer's running statistics are still
                # empty (eval mode would see raw pixels), so that point says nothing.
                curve(ax, epochs[1:], store[label][:, 1:, layer], f"{label} (lr {lr:g})",
                      COLORS[label])
            ax.axhline(0.0 if what == "mean" else 1.0, color="black", lw=0.6, ls=":")
            ax.set_title(f"hidden layer {layer + 1}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"input {what} of one unit")
            ax.grid(alpha=0.3)
        for k in range(n_layers, rows * cols):
            axes[k // cols, k % cols].axis("off")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"Input {what} of a fixed random unit per hidden layer over the validation set "
                     f"(digits conv net, {len(ctx.seeds)} seeds, 95% CI)")
        paths.append(save(fig, ctx.figures / fname))

    rows = []
    summary = {}
    for label, _, lr in METHODS:
        final_unit = np.abs(means[label][:, -1, :]).mean(axis=1)      # per seed, avg over layers
        final_all = allmean[label][:, -1, :].mean(axis=1)
        std_dev = np.abs(stds[label][:, -1, :] - 1.0).mean(axis=1)
        # drift over training: mean |change| of the unit's input mean from epoch to epoch
        drift = np.abs(np.diff(means[label][:, 1:], axis=1)).mean(axis=(1, 2))
        summary[label] = final_unit
        rows.append([label, f"{lr:g}", fmt_ci(*t_interval(final_unit), digits=3),
                     fmt_ci(*t_interval(final_all), digits=3), fmt_ci(*t_interval(std_dev), digits=3),
                     fmt_ci(*t_interval(drift), digits=3), fmt_ci(*t_interval(accs[label]), scale=100)])
    table = md_table(["method", "lr", "final abs(mean), chosen unit, avg over layers",
                      "final abs(mean), all units", "final abs(std - 1), chosen unit",
                      "epoch-to-epoch abs(change) of the mean", "final val. acc. (%)"], rows)
    imgs = "\n".join(f"![fig2]({p.parent.name}/{p.name})" for p in paths)
    return (f"## {TITLE}\n\n{stamp(ctx)}\n\n{imgs}\n\nDigits conv net ({n_layers} hidden layers), "
            f"batch size {BATCH}, {sc.epochs} epochs, lr halved every {sc.halve_every}; statistics "
            f"over the validation (test) split in eval mode after every epoch. Paper (CIFAR-10 NIN): average final distance from 0 NormProp 0.19, "
            f"BN 0.33.\n\n{table}\n")
