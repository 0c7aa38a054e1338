"""``NP_OPTIMIZER_BACKEND``: which ProjectedSGD step the worker's trainer takes, and that the
choice changes speed only -- the same training, and checkpoints that move between them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.settings import Settings
from service.snapshots import SnapshotStore
from service.trainer import ModelTrainer
from worker_helpers import small_config, synthetic


def test_the_setting_reaches_the_trainer_and_bad_values_are_refused(monkeypatch) -> None:
    monkeypatch.setenv("NP_OPTIMIZER_BACKEND", "eager")
    assert Settings().optimizer_backend == "eager"
    monkeypatch.setenv("NP_OPTIMIZER_BACKEND", "fastest")
    with pytest.raises(ValidationError, match="optimizer_backend"):
        Settings()
    cpu = torch.device("cpu")
    assert ModelTrainer(small_config(), cpu).optimizer.backend == "native"  # auto, on the CPU
    assert ModelTrainer(small_config(), cpu,
                        optimizer_backend="eager").optimizer.backend == "eager"


def _train(trainer: ModelTrainer, x: np.ndarray, y: np.ndarray) -> list[float]:
    losses = []
    for start in range(0, len(x), 7):  # batch sizes 7 and, at the end, the remainder
        losses.append(trainer.train_arrays(x[start:start + 7], y[start:start + 7]).loss)
    return losses


def test_native_and_eager_trainers_train_the_same_model() -> None:
    """float32 throughout, as the worker trains: the two steps round differently, so the
    runs agree to float32 rounding, not bit for bit."""
    x, y = synthetic(140)
    cpu = torch.device("cpu")
    native = ModelTrainer(small_config(), cpu, optimizer_backend="native")
    eager = ModelTrainer(small_config(), cpu, optimizer_backend="eager")
    a, b = _train(native, x, y), _train(eager, x, y)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert a[-1] < 0.5 * a[0]  # it learnt
    probe = torch.from_numpy(x[:20])
    native.model.eval()
    eager.model.eval()
    with torch.no_grad():
        assert torch.allclose(native.model(probe), eager.model(probe), atol=1e-4)


@pytest.mark.parametrize("other", ["eager", "project"])
def test_a_checkpoint_moves_between_backends(tmp_path, other: str) -> None:
    """A worker that restarts with another backend continues from exactly the stored state
    (written and read through the snapshot store, as the worker does): the weights as trained
    and the momentum buffers mean the same to both steps ("project", a GPU worker's step, first
    moves the stored un-normalised rows to unit rows with their gradient)."""
    x, y = synthetic(70, seed=1)
    cpu = torch.device("cpu")
    native = ModelTrainer(small_config(), cpu, optimizer_backend="native")
    _train(native, x, y)
    store = SnapshotStore(tmp_path, "m")
    store.write(1, native.checkpoint_tensors(), native.metadata())
    eager = ModelTrainer(small_config(), cpu, optimizer_backend=other)
    twin = ModelTrainer(small_config(), cpu, optimizer_backend="native")
    norms = torch.cat([m.weight.norm(dim=1) for m in native.optimizer.fused_layers])
    assert (norms - 1).abs().max() > 1e-2  # stored as trained: rows far from unit
    for trainer in (eager, twin):
        trainer.restore(store.read(1))
        for (k, a), b in zip(native.model.state_dict().items(),
                             trainer.model.state_dict().values()):
            assert torch.equal(a, b), k
    x2, y2 = synthetic(35, seed=2)
    assert np.allclose(_train(eager, x2, y2), _train(twin, x2, y2), rtol=1e-4, atol=1e-5)
