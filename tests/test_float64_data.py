"""Float64 fidelity: a float64 run sees the npz file's float64 features exactly; float32 runs are unchanged."""

import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpifedmeta.run import config, session, start
from mpifedmeta.data import load_dataset
from mpifedmeta.parallel.dist import World

ALPHA, BETA = 0.3, 0.5


def _npz(tmp_path) -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 5))
    y = np.tile(np.arange(3), 6)[:16]
    assert np.all(x.astype(np.float32).astype(np.float64) != x)   # no value is a float32
    path = str(tmp_path / "f64.npz")
    np.savez(path, x=x, y=y)
    return path, x, y


def _cfg(path: str, out: str, dtype: str) -> config.Config:
    return config.load(None, ["data.dataset=npz", f'data.path="{path}"', "data.num_agents=2", "data.partition=iid",
                              "model.name=linear", "train.rounds=1", "train.agents_per_round=2", "train.local_steps=1",
                              "train.nu=1", f"train.alpha={ALPHA}", f"train.beta={BETA}", 'train.batch_size="full"',
                              f"train.dtype={dtype}", "eval.every=1", "eval.finetune_steps=[0]",
                              f'output.dir="{out}"', "output.checkpoint_every=1"])


def _world() -> World:
    return World(MPI.COMM_SELF, 0, 1, 0, 1)


def _model(out: str, round_: int) -> dict[str, np.ndarray]:
    with h5py.File(os.path.join(out, "checkpoints", f"round_{round_:06d}.h5"), "r") as f:
        return {k: v[()] for k, v in f["model"].items()}


def _reference_round(x: np.ndarray, y: np.ndarray, train_rows: list[np.ndarray], w0: dict) -> dict:
    """One local step of the exact ν = 1 meta-gradient per agent (plain autograd), averaged."""
    X, Y = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
    new = []
    for rows in train_rows:
        xa, ya = X[rows], Y[rows]
        W, b = (torch.tensor(w0[k], requires_grad=True) for k in ("weight", "bias"))

        def f(W_, b_):
            return F.cross_entropy(xa @ W_.T + b_, ya)

        gW, gb = torch.autograd.grad(f(W, b), (W, b), create_graph=True)
        meta = f(W - ALPHA * gW, b - ALPHA * gb)
        mW, mb = torch.autograd.grad(meta, (W, b))
        new.append({"weight": (W - BETA * mW).detach(), "bias": (b - BETA * mb).detach()})
    return {k: (sum(n[k] for n in new) / len(new)).numpy() for k in ("weight", "bias")}


def test_float64_run_uses_the_exact_float64_features(tmp_path):
    path, x, y = _npz(tmp_path)
    assert load_dataset("npz", path, "float64").x.dtype == np.float64
    assert np.array_equal(load_dataset("npz", path, "float64").x, x)
    out = str(tmp_path / "run64")
    assert start.start_new(_cfg(path, out, "float64"), _world()) == 0
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        ptr, idx = f["partition/train_ptr"][()], f["partition/train_idx"][()]
    rows = [idx[ptr[a]:ptr[a + 1]] for a in range(2)]
    got, w0 = _model(out, 1), _model(out, 0)
    exact = _reference_round(x, y, rows, w0)
    rounded = _reference_round(x.astype(np.float32).astype(np.float64), y, rows, w0)
    for k in exact:
        np.testing.assert_allclose(got[k], exact[k], rtol=1e-12, atol=1e-14)
        # the check can see the difference: features rounded to float32 give another model
        assert np.max(np.abs(rounded[k] - exact[k])) > 1e-10


def test_float32_run_keeps_float32_features(tmp_path):
    path, x, _ = _npz(tmp_path)
    assert load_dataset("npz", path).x.dtype == np.float32
    s = session.setup(_cfg(path, str(tmp_path / "run32"), "float32"), _world())
    rows = s.population.partition.train_idx
    assert s.round.agents.block.X_train.dtype == torch.float32
    assert torch.equal(s.round.agents.block.X_train, torch.as_tensor(x[rows].astype(np.float32)))
