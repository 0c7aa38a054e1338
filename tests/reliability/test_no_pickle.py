"""No pickle anywhere: unpickling untrusted bytes runs arbitrary code, and snapshots, stream
entries and request bodies all come from outside the process.

1. Statically: every ``.py`` under ``normprop/``, ``service/`` and ``benchmarks/`` is parsed
   with :mod:`ast`; the test fails on an import of a pickle-family module (``pickle``,
   ``cPickle``, ``_pickle``, ``dill``, ``joblib``, ``cloudpickle``, ``shelve``), a call of
   ``pickle.load``/``loads``/``Unpickler``, ``torch.load`` without ``weights_only=True``, and
   ``numpy.load`` with ``allow_pickle`` other than a literal ``False``.
2. At run time, in a fresh interpreter (an audit hook cannot be removed): with a
   ``sys.addaudithook`` hook recording every ``pickle.find_class`` event (CPython raises one
   for each global an unpickler resolves), a snapshot is published, loaded by the API's
   model server and by the trainer's restore path, and a prediction is served in-process;
   no event may occur. A ``torch.save``/``torch.load(weights_only=False)`` round trip at the
   end must be caught by the same hook, which proves it watches.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("normprop", "service", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain of names, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_findings(source: str, filename: str) -> list[str]:
    """What in ``source`` unpickles or could: ``file:line: what`` per finding."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    # Local names bound to torch, numpy, their load functions, or a pickle module.
    torch_names, numpy_names, torch_load, numpy_load, pickle_names = (
        {"torch"}, {"numpy", "np"}, set(), set(), set())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                local = alias.asname or alias.name.split(".")[0]
                if top in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
                    pickle_names.add(local)
                elif alias.name == "torch":
                    torch_names.add(local)
                elif alias.name == "numpy":
                    numpy_names.add(local)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in PICKLE_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == "torch" and alias.name == "load":
                    torch_load.add(local)
                elif node.module == "numpy" and alias.name == "load":
                    numpy_load.add(local)
                elif alias.name in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import "
                                 f"{alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, attr = name.rpartition(".")
        where = f"{filename}:{node.lineno}"
        if (head in pickle_names or head in PICKLE_MODULES) and attr in PICKLE_CALLS:
            found.append(f"{where}: {name}(...)")
        if (head in torch_names and attr == "load") or name in torch_load:
            if not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where}: {name}(...) without weights_only=True")
        if (head in numpy_names and attr == "load") or name in numpy_load:
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                found.append(f"{where}: {name}(..., allow_pickle=...) not False")
    return found


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, files
    return files


def test_no_pickle_in_the_source() -> None:
    findings: list[str] = []
    for path in _sources():
        findings += pickle_findings(path.read_text(), str(path.relative_to(ROOT)))
    assert not findings, "\n".join(findings)


def test_the_scanner_finds_what_it_looks_for() -> None:
    """Each rule on a snippet that breaks it (and the safe forms pass)."""
    bad = {
        "import pickle": 1, "import cPickle as cp": 1, "import dill": 1, "import joblib": 1,
        "from pickle import loads": 1, "from joblib import load": 1, "import shelve": 1,
        "import pickle as p\np.loads(b'')": 2, "import torch\ntorch.load('f')": 1,
        "import torch as t\nt.load('f', weights_only=False)": 1,
        "from torch import load\nload('f')": 1, "import torch\ntorch.load('f', weights_only=w)": 1,
        "import numpy as np\nnp.load('f', allow_pickle=True)": 1,
        "import numpy\nnumpy.load('f', allow_pickle=flag)": 1,
        "from numpy import load as l\nl('f', allow_pickle=True)": 1,
    }
    for source, n in bad.items():
        assert len(pickle_findings(source, "x.py")) == n, source
    good = ["import torch\ntorch.load('f', weights_only=True)",
            "import numpy as np\nnp.load('f')\nnp.load('f', allow_pickle=False)",
            "from safetensors.torch import load_file\nload_file('f')",
            "import json\njson.loads('1')"]
    for source in good:
        assert pickle_findings(source, "x.py") == [], source


RUNTIME_CHECK = textwrap.dedent('''
    import json, sys
    events = []
    watching = False

    def hook(event, args):
        if watching and event == "pickle.find_class":
            events.append(f"{args[0]}.{args[1]}")

    sys.addaudithook(hook)

    import io, threading
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from fastapi.testclient import TestClient
    from test_api_support import publish
    from service.api import create_app
    from service.settings import ModelConfig, Settings
    from service.snapshots import SnapshotStore, load_network
    from service.trainer import ModelTrainer

    tmp = Path(sys.argv[1])
    cfg = ModelConfig(name="default", input_shape=[4], num_classes=3, spec="mlp:8")
    store = SnapshotStore(tmp / "snapshots", "default")
    publish(store, cfg, 1)
    settings = Settings(data_dir=tmp, models=[cfg], redis_url="redis://127.0.0.1:9/0",
                        redis_connect_timeout=0.2, redis_socket_timeout=0.2)
    out = {}
    watching = True
    # The API: the model server loads the snapshot; a prediction is served.
    with TestClient(create_app(settings)) as client:
        resp = client.post("/predict", json={"instances": [[0.5, 1.0, -1.0, 2.0]]})
        out["predict"] = [resp.status_code, resp.json().get("version")]
        out["versions_read"] = client.get("/models/default").json()["version"]
    # The worker's side: read, build and restore a trainer from the snapshot.
    snap = store.read(1)
    load_network(snap, cfg)
    trainer = ModelTrainer(cfg, torch.device("cpu"))
    trainer.restore(snap)
    out["restored"] = True
    out["events_while_serving"] = list(events)
    # The hook watches: a real unpickling is seen.
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    out["events_with_torch_load"] = len(events) - len(out["events_while_serving"])
    print(json.dumps(out))
''')


def test_snapshot_load_and_predict_unpickle_nothing(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(RUNTIME_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path),
                           str(ROOT / "tests" / "service")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["predict"] == [200, 1] and out["versions_read"] == 1 and out["restored"]
    assert out["events_while_serving"] == [], out
    assert out["events_with_torch_load"] > 0, out
