"""Tests for mpifedmeta.report on synthetic metrics.h5 files that follow docs/hdf5-layout.md."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpifedmeta.report import ReportError, load_run, make_report

PNGS = ["accuracy.png", "loss.png", "distribution.png", "train_loss.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(
    out_dir,
    *,
    nu=1,
    metagrad="exact",
    ks=(0, 1, 5),
    eval_rounds=(0, 5, 10),
    num_rounds=10,
    num_agents=8,
    num_holdout=3,
    final_train_acc=None,
    wall_time_per_round=1.5,
    seed=0,
):
    """Write a layout-conformant OUT/metrics.h5 (docs/hdf5-layout.md) and return its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.h5")
    ks = np.asarray(ks, dtype=np.int64)
    rounds = np.asarray(eval_rounds, dtype=np.int64)
    R, K, A, H = len(rounds), len(ks), num_agents, num_holdout
    N = A + H + 2  # a couple of agents that are neither evaluated nor holdout

    progress = (rounds / max(num_rounds, 1))[:, None, None]  # (R, 1, 1)
    kgain = (np.log1p(ks) / 10)[None, :, None]
    train_acc = np.clip(0.3 + 0.4 * progress + kgain + 0.05 * rng.standard_normal((R, K, A)), 0, 1)
    holdout_acc = np.clip(0.25 + 0.4 * progress + kgain + 0.05 * rng.standard_normal((R, K, H)), 0, 1)
    train_loss = 2.5 - 2 * train_acc + 0.01 * rng.random((R, K, A))
    holdout_loss = 2.5 - 2 * holdout_acc + 0.01 * rng.random((R, K, H))
    train_acc, holdout_acc = train_acc.astype(np.float32), holdout_acc.astype(np.float32)
    train_loss, holdout_loss = train_loss.astype(np.float32), holdout_loss.astype(np.float32)

    train_acc_mean = train_acc.mean(axis=2, dtype=np.float64)
    if final_train_acc is not None:  # a known number to find in summary.md
        train_acc_mean[-1, :] = final_train_acc
    nan = np.full((R, K), np.nan)
    holdout_acc_mean = holdout_acc.mean(axis=2, dtype=np.float64) if H else nan
    holdout_loss_mean = holdout_loss.mean(axis=2, dtype=np.float64) if H else nan

    config = {
        "seed": seed,
        "data": {"dataset": "synthetic", "num_agents": N, "holdout_fraction": H / N},
        "model": {"name": "mlp"},
        "train": {"nu": nu, "metagrad": metagrad, "rounds": num_rounds, "alpha": 0.01, "beta": 0.001},
        "eval": {"every": 5, "finetune_steps": ks.tolist()},
        "output": {"dir": str(out_dir)},
    }
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "mpifedmeta.metrics"
        f.attrs["format_version"] = 1
        f.attrs["config"] = json.dumps(config)
        f.attrs["mpifedmeta_version"] = "0.1.0"
        f.attrs["torch_version"] = "2.3.0"
        f.attrs["strategy"] = "vmap"
        f.attrs["num_params"] = 1234

        tr = f.create_group("train")
        rr = np.arange(1, num_rounds + 1, dtype=np.int64)
        cols = {
            "round": rr,
            "meta_loss": 2.0 / np.sqrt(rr) + 0.05 * rng.random(num_rounds),
            "wall_time": wall_time_per_round * rr.astype(np.float64),
            "round_time": np.full(num_rounds, wall_time_per_round),
            "allreduce_time": np.full(num_rounds, 0.01),
            "bytes_allreduced": np.full(num_rounds, 1234 * 8, dtype=np.int64),
            "num_sampled": np.full(num_rounds, 4, dtype=np.int64),
        }
        for name, col in cols.items():
            tr.create_dataset(name, data=col, maxshape=(None,), chunks=True)

        ev = f.create_group("eval")
        ev.attrs["finetune_steps"] = ks
        ev.create_dataset("round", data=rounds, maxshape=(None,), chunks=True)
        ev.create_dataset("train_loss_mean", data=train_loss.mean(axis=2, dtype=np.float64))
        ev.create_dataset("train_acc_mean", data=train_acc_mean)
        ev.create_dataset("holdout_loss_mean", data=holdout_loss_mean)
        ev.create_dataset("holdout_acc_mean", data=holdout_acc_mean)
        ev.create_dataset("train_agent_loss", data=train_loss)
        ev.create_dataset("train_agent_acc", data=train_acc)
        ev.create_dataset("holdout_agent_loss", data=holdout_loss)
        ev.create_dataset("holdout_agent_acc", data=holdout_acc)
        ev.create_dataset("train_agent_ids", data=np.arange(A, dtype=np.int64))
        ev.create_dataset("holdout_agent_ids", data=np.arange(A, A + H, dtype=np.int64))

        p = f.create_group("partition")
        sizes = rng.integers(5, 10, size=N)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        p.create_dataset("train_ptr", data=ptr)
        p.create_dataset("test_ptr", data=ptr)
        p.create_dataset("train_idx", data=np.arange(ptr[-1], dtype=np.int64))
        p.create_dataset("test_idx", data=np.arange(ptr[-1], dtype=np.int64))
        holdout = np.zeros(N, dtype=bool)
        holdout[A : A + H] = True
        p.create_dataset("holdout", data=holdout)
        p.attrs["dataset"] = "synthetic"
        p.attrs["num_classes"] = 10
        p.attrs["scheme"] = "dirichlet"
    return path


def assert_real_png(path):
    import matplotlib.image as mpimg

    assert os.path.getsize(path) > 1000, path
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3].reshape(-1, 3)
    assert np.unique(rgb, axis=0).shape[0] > 10, f"{path} looks like a flat image"


def test_three_runs(tmp_path):
    finals = {0: 0.6134, 1: 0.7421, 3: 0.8356}
    dirs = []
    for i, nu in enumerate(finals):
        d = tmp_path / f"run_nu{nu}"
        write_metrics(d, nu=nu, final_train_acc=finals[nu], wall_time_per_round=12.5, seed=i)
        dirs.append(str(d))
    dest = tmp_path / "report"
    written = make_report(dirs, str(dest))

    assert sorted(os.path.basename(p) for p in written) == sorted(PNGS + ["summary.md"])
    for p in written:
        assert os.path.isfile(p)
        assert os.path.dirname(os.path.abspath(p)) == str(dest)
    for name in PNGS:
        assert_real_png(dest / name)
    assert not [n for n in os.listdir(dest) if n.startswith(".")], "temporary files left behind"

    summary = (dest / "summary.md").read_text()
    for nu, acc in finals.items():
        assert (f"nu={nu} exact" if nu else "FedAvg (nu=0)") in summary
        assert f"{100 * acc:.1f} ±" in summary  # 61.3, 74.2, 83.6
    assert "125.0 s" not in summary and "2m 05s" in summary  # 10 rounds * 12.5 s
    for name in PNGS:
        assert f"]({name})" in summary
    # one table row per run
    assert sum(1 for line in summary.splitlines() if line.startswith(("| nu=", "| FedAvg"))) == 3


def test_load_run_contents(tmp_path):
    d = tmp_path / "run"
    write_metrics(d, nu=2, metagrad="first_order", ks=(0, 3), eval_rounds=(0, 4, 8), num_rounds=8,
                  num_agents=6, num_holdout=2)
    run = load_run(str(d))
    assert run.config["train"]["nu"] == 2
    assert run.finetune_steps.tolist() == [0, 3]
    assert run.eval_round.tolist() == [0, 4, 8]
    assert run.train_acc_mean.shape == (3, 2)
    assert run.final_train_agent_acc.shape == (2, 6)
    assert run.final_holdout_agent_acc.shape == (2, 2)
    assert run.train["round"].tolist() == list(range(1, 9))
    assert run.rounds == 8 and run.wall_time == pytest.approx(12.0)
    assert run.attrs["strategy"] == "vmap"
    # the metrics file itself is accepted as well
    assert load_run(str(d / "metrics.h5")).eval_round.tolist() == [0, 4, 8]


def test_no_holdout(tmp_path):
    d = tmp_path / "noholdout"
    write_metrics(d, num_holdout=0, final_train_acc=0.5555)
    run = load_run(str(d))
    assert run.num_holdout == 0 and not run.has_holdout
    dest = tmp_path / "rep"
    make_report([str(d)], str(dest))
    for name in PNGS:
        assert_real_png(dest / name)
    summary = (dest / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| nu=1 exact"))
    assert "55.5 ±" in row or "55.6 ±" in row
    assert "\u2013" in row  # holdout cells


def test_different_k_and_single_eval_row(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_metrics(a, nu=0, ks=(0, 1), eval_rounds=(0,), num_rounds=0, num_holdout=0)
    write_metrics(b, nu=1, ks=(1, 5), eval_rounds=(0, 3), num_rounds=3)
    dest = tmp_path / "rep"
    make_report([str(a), str(b)], str(dest))
    for name in PNGS:
        assert_real_png(dest / name)
    summary = (dest / "summary.md").read_text()
    for k in (0, 1, 5):
        assert f"train acc k={k}" in summary
    row_a = next(line for line in summary.splitlines() if line.startswith("| FedAvg (nu=0)"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells[1] == "0"  # no training rounds
    assert cells[-1] == "\u2013"  # no wall time
    assert cells[-3:-1] == ["\u2013", "\u2013"]  # k=5 not evaluated


def test_labels(tmp_path):
    a, b = tmp_path / "x" / "seed0", tmp_path / "x" / "seed1"
    write_metrics(a, nu=1)
    write_metrics(b, nu=1, seed=1)
    dest = tmp_path / "rep"
    make_report([str(a), str(b)], str(dest))
    summary = (dest / "summary.md").read_text()
    assert "nu=1 exact (seed0)" in summary and "nu=1 exact (seed1)" in summary

    make_report([str(a), str(b)], str(dest), labels=["MAML", "Reptile"])
    summary = (dest / "summary.md").read_text()
    assert "| MAML |" in summary and "| Reptile |" in summary
    with pytest.raises(ReportError):
        make_report([str(a), str(b)], str(dest), labels=["only one"])


def test_missing_file(tmp_path):
    d = tmp_path / "nothing_here"
    with pytest.raises(ReportError) as ei:
        load_run(str(d))
    assert str(d / "metrics.h5") in str(ei.value)
    with pytest.raises(ReportError):
        make_report([str(d)], str(tmp_path / "rep"))


def test_not_hdf5(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "metrics.h5").write_text("this is not an HDF5 file\n" * 20)
    with pytest.raises(ReportError) as ei:
        load_run(str(d))
    assert str(d / "metrics.h5") in str(ei.value)
    assert "\n" not in str(ei.value)


def test_no_format_attr(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    with h5py.File(d / "metrics.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(ReportError) as ei:
        load_run(str(d))
    msg = str(ei.value)
    assert str(d / "metrics.h5") in msg and "not an mpifedmeta metrics file" in msg


def test_wrong_format_attr(tmp_path):
    d = tmp_path / "ckpt"
    path = write_metrics(d)
    with h5py.File(path, "a") as f:
        f.attrs["format"] = "mpifedmeta.checkpoint"
    with pytest.raises(ReportError, match="not an mpifedmeta metrics file"):
        load_run(str(d))


def test_truncated_file(tmp_path):
    d = tmp_path / "trunc"
    path = write_metrics(d)
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ReportError) as ei:
        load_run(str(d))
    assert path in str(ei.value)


def test_missing_dataset(tmp_path):
    d = tmp_path / "partial"
    path = write_metrics(d)
    with h5py.File(path, "a") as f:
        del f["eval/train_acc_mean"]
    with pytest.raises(ReportError, match="eval/train_acc_mean"):
        load_run(str(d))


def test_import_does_not_import_matplotlib():
    code = "import sys, mpifedmeta.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shared_y_axes(tmp_path):
    """--sharey: the accuracy and loss curves of every k on one y-axis."""
    a = tmp_path / "a"
    write_metrics(a, nu=1, ks=(0, 1, 2))
    from mpifedmeta.report import plots
    seen = {}
    real = plots._new_figure

    def spy(n, width=4.8, height=3.6, sharey=False):
        fig, axes = real(n, width, height, sharey)
        seen.setdefault(sharey, []).append(axes)
        return fig, axes
    plots._new_figure = spy
    try:
        make_report([str(a)], str(tmp_path / "shared"), sharey=True)
    finally:
        plots._new_figure = real
    shared = seen[True]
    assert len(shared) == 2 and all(ax.get_shared_y_axes().joined(axes[0], ax) for axes in shared for ax in axes)
