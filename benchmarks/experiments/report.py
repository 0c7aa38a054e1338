"""Where results go: figures under ``<out>/figures/``, numbers into sections of
``<out>/RESULTS.md``.

Each experiment owns one section of RESULTS.md, fenced by ``<!-- BEGIN name -->`` and
``<!-- END name -->``; rerunning an experiment rewrites its section only, so hand-written text
outside the fences (the discussion) survives. Each section records the command, seeds, machine
and date of the run that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Context", "machine_line", "update_section", "md_table", "fmt_ci"]

HEADER = """# Results: the paper's experiments and the online peers, reproduced at CPU scale

Normalization Propagation (Arpit et al., ICML 2016), sections 5.1-5.6 and table 1, plus the
online-learning comparison this service exists for. Every number below comes from an actual run
of the command printed in its section; each section is rewritten by its own command and the
discussion at the end is written by hand.

## How to rerun

    pip install -e ".[experiments]"        # scikit-learn, matplotlib, river, mnist1d, tqdm
    python -m benchmarks.experiments all    # or one of: data_norm covariate_shift convergence
                                            #   batch_size speed table1 online
    python -m benchmarks.experiments all --quick --out /tmp/quick   # smoke test, seconds

Options: `--seeds 0 1 2` (default), `--threads 1` (default; torch threads), `--out docs`
(default; writes `docs/RESULTS.md` and `docs/figures/*.png`). Tests: `python -m pytest
tests/experiments -q`.

## What was scaled down (and why)

The paper trains a 12-layer Network-in-Network on CIFAR-10/100 and SVHN for 30-200 epochs on a
GPU. Here everything runs on a 2-core CPU in minutes per experiment, with no download:

- Data: scikit-learn's bundled **digits** (8x8 images, 1,257 train / 540 test), **MNIST-1D**
  (generated offline by the `mnist1d` package, its standard 4,000 / 1,000 split) and River's
  bundled **Image Segmentation** (2,310 samples, 18 features, 7 classes). As in the paper, the
  test split is the validation set of the per-epoch curves.
- Nets: a 10-layer NIN in miniature for digits,
  `C(32,3,1,1)-C(32,1,1,0)-P(2,2,0,max)-C(64,3,1,1)-C(64,1,1,0)-P(2,2,0,max)-C(64,1,1,0)-C(64,1,1,0)-C(10,1,1,0)-P(2,2,0,avg)`
  (6 hidden layers, global-average-pooled output); MLPs 256-256-256 (MNIST-1D) and 128-128
  (segment, and every online net).
- Protocol kept from the paper: SGD momentum 0.9, weight decay 5e-4, unit-norm projection after
  every step, batch size 50 at lr 0.05 (100 at 0.08), lr halved every 10 epochs, 30 epochs
  (12 for the batch-size sweep), no dropout, no augmentation. Every method gets the same rate.
- 3 seeds per configuration, 95% Student-t intervals over seeds (the paper's figures show 95%
  intervals too; with 3 seeds t = 4.30, so the intervals are wide).
- **No GPU was available in this session**: every time is CPU time (torch, 1 thread). The
  paper's speed claim (5.6) is a GPU claim; it is not tested here.
"""


@dataclass
class Context:
    """One runner invocation: where to write, how big, which seeds."""

    out: Path
    quick: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    command: str = ""

    @property
    def figures(self) -> Path:
        d = self.out / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def results(self) -> Path:
        return self.out / "RESULTS.md"


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = "no GPU (CPU only)" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), Python {sys.version.split()[0]}, {gpu}")


def code_version() -> str:
    """The commit the library ran at, and whether ``normprop/`` had uncommitted edits."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "normprop"], cwd=root,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted normprop/ edits" if dirty else "")


def stamp(ctx: Context) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        load = "load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min; shared machine)".format(
            *os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        load = ""
    return (f"*Command:* `{ctx.command}` · *seeds:* {', '.join(map(str, ctx.seeds))} · "
            f"*date:* {now} · *code:* {code_version()}  \n*Machine:* {machine_line()}; {load}")


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the fenced section ``name`` of the markdown file ``path``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def fmt_ci(mean: float, half: float, digits: int = 2, scale: float = 1.0) -> str:
    """``"12.34 ± 0.56"``; ``nan`` half-widths (one seed) print the mean only.

    >>> fmt_ci(0.1234, 0.0056, scale=100)
    '12.34 ± 0.56'
    """
    if mean != mean:
        return "n/a"
    if half != half:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table.

    >>> print(md_table(["a", "b"], [["1", "2"]]))
    | a | b |
    |---|---|
    | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
