"""The paper's experiments (Arpit et al. 2016, section 5) and the online-learning peers, at
CPU scale.

One module per experiment, each with ``NAME``, ``TITLE`` and ``run(ctx) -> markdown``:

==================  ===========================================================================
``data_norm``       fig. 1 -- global vs batch data normalisation, batch sizes 50 and 100
``covariate_shift`` fig. 2 -- a hidden unit's input mean/std per epoch: NormProp, BN, none
``convergence``     fig. 3 -- validation accuracy per epoch, NormProp vs BN
``batch_size``      fig. 4 -- NormProp at batch sizes 1..128, BN beside it (and at 1 and 2)
``speed``           sec. 5.6 -- time per training epoch, NormProp / BN
``table1``          table 1 in miniature -- final test error per method and data set
``online``          one pass over shuffled (and drifting) streams vs River, prequential
==================  ===========================================================================

Run ``python -m benchmarks.experiments <name>|all [--quick]``.
"""

from __future__ import annotations

import importlib

EXPERIMENTS = ("data_norm", "covariate_shift", "convergence", "batch_size", "speed", "table1",
               "online")


def get(name: str):
    """The experiment module called ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")
