"""``python -m benchmarks.experiments <name>|all [--quick] [--seeds 0 1 2] [--out DIR]``.

Full runs write ``docs/figures/*.png`` and their section of ``docs/RESULTS.md``; ``--quick``
runs a tiny configuration (for smoke tests) into ``runs/quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import EXPERIMENTS, get
from .report import Context, update_section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments",
                                description="Regenerate the paper's figures and tables at CPU scale.")
    p.add_argument("name", choices=(*EXPERIMENTS, "all"), help="experiment to run, or all")
    p.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (default 0 1 2; quick: 0 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for RESULTS.md and figures/ (default docs/, quick: runs/quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the machine is shared, and small nets are "
                        "dispatch-bound anyway)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    out = args.out or Path("runs/quick" if args.quick else "docs")
    argv_shown = sys.argv[1:] if argv is None else argv
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    for name in names:
        cmd = "python -m benchmarks.experiments " + " ".join(
            shlex.quote(a) for a in ([name] + [a for a in argv_shown if a != args.name and a != "all"]))
        ctx = Context(out=out, quick=args.quick, seeds=seeds, command=cmd)
        t0 = time.perf_counter()
        body = get(name).run(ctx)
        minutes = (time.perf_counter() - t0) / 60
        body = body.rstrip() + f"\n\n*Wall time of this experiment: {minutes:.1f} min.*\n"
        update_section(ctx.results, name, body)
        print(f"[{name}] done in {minutes:.1f} min -> {ctx.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
