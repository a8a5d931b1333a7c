"""Data through Hugging Face ``datasets`` (data.dataset = "hf:NAME_OR_PATH", mpifedmeta/data/hf.py).

No network: every dataset is built here, with the shapes and column types of the three ready configs
(configs/femnist.toml, cifar10.toml, shakespeare.toml), and stored with ``save_to_disk`` and as parquet / CSV
files. The HF cache of the test process and of every CLI run is a temporary directory.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install -e '.[hf]')")

from helpers import (assert_models_identical, assert_ok, assert_one_error_line, final_model, run_cli,  # noqa: E402
                     sets)

from mpifedmeta.data import hf  # noqa: E402
from mpifedmeta.federation import population  # noqa: E402
from mpifedmeta.parallel import dist  # noqa: E402
from mpifedmeta.run import config  # noqa: E402

VOCAB = hf.LEAF_VOCAB
WRITERS = ["f0420_11", "f0007_02", "f1999_50", "f0100_00", "f0007_10", "f0300_33"]   # not in sorted order
WRITER_ROWS = [9, 12, 8, 14, 10, 11]
SPEAKERS = ["THE_TEMPEST_PROSPERO", "HAMLET_HAMLET", "KING_LEAR_LEAR", "AS_YOU_LIKE_IT_ROSALIND"]
SPEAKER_ROWS = [12, 9, 15, 10]
CIFAR_TRAIN, CIFAR_TEST = 240, 60
RUN = dict(train__rounds=2, train__local_steps=1, train__nu=1, train__batch_size=4, train__alpha=0.05,
           train__beta=0.05, eval__every=2, eval__finetune_steps=[0, 1], output__checkpoint_every=2)


def _interleave(counts, rng) -> np.ndarray:
    """Owner of each row: every owner's rows in order, the owners interleaved at random."""
    owners = np.repeat(np.arange(len(counts)), counts)
    return owners[rng.permutation(owners.shape[0])]


def _femnist(rng):
    from PIL import Image
    owner = _interleave(WRITER_ROWS, rng)
    pixels = rng.integers(0, 256, (owner.shape[0], 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 62, owner.shape[0])
    features = datasets.Features({"image": datasets.Image(), "character": datasets.ClassLabel(num_classes=62),
                                  "writer_id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels],
                                     "character": labels.tolist(), "writer_id": [WRITERS[o] for o in owner]},
                                    features=features)
    return ds, pixels, labels, owner


def _cifar(rng):
    from PIL import Image
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    parts, arrays = {}, {}
    for split, n in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(n) % 10
        parts[split] = datasets.Dataset.from_dict({"img": [Image.fromarray(p, mode="RGB") for p in pixels],
                                                   "label": labels.tolist()}, features=features)
        arrays[split] = (pixels, labels)
    return datasets.DatasetDict(parts), arrays


def _shakespeare(rng):
    """Each speaker's text windows in time order (x: 80 characters, y: the next one), speakers interleaved;
    two characters outside the LEAF vocabulary: 'é' in speaker 0's text (in 6 windows and 1 label) and '~' in
    speaker 1's (in 5 windows and 1 label)."""
    owner = _interleave(SPEAKER_ROWS, rng)
    streams = []
    for a, n in enumerate(SPEAKER_ROWS):
        text = list(rng.choice(list(VOCAB), n + 80))
        if a == 0:
            text[85] = "é"           # in the windows of rows 6..11 and the label of row 5
        if a == 1:
            text[83] = "~"           # in the windows of rows 4..8 and the label of row 3
        streams.append("".join(text))
    seen = np.zeros(len(SPEAKER_ROWS), dtype=np.int64)
    xs, ys = [], []
    for o in owner:
        j = seen[o]
        seen[o] += 1
        xs.append(streams[o][j:j + 80])
        ys.append(streams[o][j + 80])
    ds = datasets.Dataset.from_dict({"x": xs, "y": ys, "character_id": [SPEAKERS[o] for o in owner]})
    return ds, owner


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The datasets, each saved with save_to_disk and as data files; the HF cache in a temporary directory."""
    root = tmp_path_factory.mktemp("hf")
    cache = str(root / "hf_home")
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = os.path.join(cache, "datasets")
    rng = np.random.default_rng(7)
    datasets.disable_progress_bars()
    fem, pixels, labels, owner = _femnist(rng)
    fem.save_to_disk(str(root / "femnist"))
    fem.to_parquet(str(root / "femnist_pq" / "train-00000-of-00001.parquet"))
    cifar, cifar_arrays = _cifar(rng)
    cifar.save_to_disk(str(root / "cifar"))
    for split in ("train", "test"):
        cifar[split].to_parquet(str(root / "cifar_pq" / f"{split}-00000-of-00001.parquet"))
    shake, shake_owner = _shakespeare(rng)
    shake.save_to_disk(str(root / "shakespeare"))
    os.makedirs(root / "shakespeare_csv")
    shake.to_csv(str(root / "shakespeare_csv" / "train.csv"), index=False)
    yield {"root": root, "cache": cache, "femnist": (fem, pixels, labels, owner), "cifar": cifar_arrays,
           "shakespeare": (shake, shake_owner)}
    datasets.config.HF_DATASETS_CACHE = old


FEMNIST = dict(data__features="image", data__label="character", data__agent_column="writer_id",
               data__partition="natural", data__num_agents=0, data__holdout_agents=1, data__test_fraction=0.25,
               model__name="cnn", model__hidden=[16], train__agents_per_round=3)
CIFAR = dict(data__features="img", data__label="label", data__partition="dirichlet", data__dirichlet_alpha=0.1,
             data__num_agents=10, model__name="cnn", model__hidden=[16], train__agents_per_round=4, train__nu=0,
             eval__finetune_steps=[1])
SHAKESPEARE = dict(data__features="x", data__label="y", data__agent_column="character_id", data__partition="natural",
                   data__num_agents=0, data__test_fraction=0.2, model__name="mlp", model__hidden=[16],
                   train__agents_per_round=2, train__alpha=0.001, train__beta=0.001)    # raw ids 0..80 as inputs


def _cfg(path, **values):
    args = [a for a in sets(data__dataset=f"hf:{path}", **values) if a != "--set"]
    return config.load(None, args)


def _population(path, **values):
    return population.make_population(_cfg(path, **values).data, 0)


def _cli(data, path, tmp_path, np_=None, env=None, **values):
    out = str(tmp_path / f"out{np_ or ''}")
    os.makedirs(tmp_path, exist_ok=True)
    args = ["run", _empty_config(tmp_path)] + sets(data__dataset=f"hf:{path}", output__dir=out, **{**RUN, **values})
    proc = run_cli(args, np_=np_, env={"HF_HOME": data["cache"], **(env or {})})
    return proc, out


def _empty_config(directory) -> str:
    path = os.path.join(str(directory), "hf.toml")
    with open(path, "w") as f:
        f.write("# every key from --set\n")
    return path


def _partition(out):
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        return {k: v[()] for k, v in f["partition"].items()}


def _rows(ptr, idx, a):
    return idx[ptr[a]:ptr[a + 1]]


# --------------------------------------------------------------------------- FEMNIST-like
def test_femnist_natural_partition_runs_with_agents_in_sorted_writer_order(data, tmp_path):
    _, pixels, _, owner = data["femnist"]
    proc, out = _cli(data, data["root"] / "femnist", tmp_path, **FEMNIST)
    assert_ok(proc)
    assert "6 agents (1 holdout)" in proc.stdout
    p = _partition(out)
    writer = np.array(WRITERS)[owner]
    for a, name in enumerate(sorted(WRITERS)):
        rows = np.concatenate([_rows(p["train_ptr"], p["train_idx"], a), _rows(p["test_ptr"], p["test_idx"], a)])
        assert sorted(rows.tolist()) == np.flatnonzero(writer == name).tolist(), a
        n = rows.shape[0]                 # test_fraction 0.25 of each writer's samples (no test split in the data)
        assert p["test_ptr"][a + 1] - p["test_ptr"][a] == min(max(int(np.floor(0.25 * n + 0.5)), 1), n - 1)


def test_femnist_images_are_float_chw_in_0_1_and_parquet_gives_the_same_data(data):
    _, pixels, labels, _ = data["femnist"]
    pops = [_population(data["root"] / d, **FEMNIST) for d in ("femnist", "femnist_pq")]
    for pop in pops:
        x = pop.ds.x
        assert x.shape == (pixels.shape[0], 1, 28, 28) and x.dtype == np.float32 and pop.num_classes == 62
        rows = np.array([5, 0, 17, 5])
        got = x[rows]
        assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
        assert np.array_equal(got[:, 0], pixels[rows].astype(np.float32) / np.float32(255))
        assert np.array_equal(pop.ds.y, labels)
    a, b = (pop.partition for pop in pops)
    for k in ("train_ptr", "train_idx", "test_ptr", "test_idx"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    # images: test_split "auto" is the random split (not the temporal one)
    assert not pops[0].ds.temporal


def test_min_samples_leaves_the_small_writers_out(data):
    _, _, _, owner = data["femnist"]
    pop = _population(data["root"] / "femnist", **{**FEMNIST, "data__min_samples": 10})
    kept = sorted(w for w, n in zip(WRITERS, WRITER_ROWS) if n >= 10)
    assert pop.num_agents == len(kept) == 4
    p, writer = pop.partition, np.array(WRITERS)[owner]
    for a, name in enumerate(kept):
        rows = np.concatenate([_rows(p.train_ptr, p.train_idx, a), _rows(p.test_ptr, p.test_idx, a)])
        assert sorted(rows.tolist()) == np.flatnonzero(writer == name).tolist()


def test_a_rank_converts_only_the_rows_of_its_own_agents(data):
    import torch
    pop = _population(data["root"] / "femnist", **FEMNIST)
    x, p = pop.ds.x, pop.partition
    assert x.converted == 0                                      # loading converted nothing
    lo, hi = dist.block_range(pop.num_agents, 2, 1)              # rank 1 of 2
    block = pop.resident_block(lo, hi, torch.device("cpu"), torch.float32)
    mine = int(p.train_ptr[hi] - p.train_ptr[lo] + p.test_ptr[hi] - p.test_ptr[lo])
    assert x.converted == mine < x.shape[0]
    assert block.X_train.shape[0] + block.X_test.shape[0] == mine
    tr = p.train_idx[p.train_ptr[lo]:p.train_ptr[hi]]
    assert torch.equal(block.X_train, torch.as_tensor(x[tr]))


def test_femnist_bit_identical_on_1_and_2_ranks(data, tmp_path):
    values = {**FEMNIST, "model__name": "mlp"}
    one, out1 = _cli(data, data["root"] / "femnist", tmp_path / "p1", np_=1, **values)
    two, out2 = _cli(data, data["root"] / "femnist", tmp_path / "p2", np_=2, **values)
    assert_ok(one)
    assert_ok(two)
    assert_models_identical(final_model(out1), final_model(out2), "1 vs 2 ranks")


# --------------------------------------------------------------------------- CIFAR-like
def test_cifar_dirichlet_uses_the_test_split_as_the_pooled_test_set(data, tmp_path):
    proc, out = _cli(data, data["root"] / "cifar_pq", tmp_path, **CIFAR)
    assert_ok(proc)
    p = _partition(out)
    labels = np.concatenate([data["cifar"]["train"][1], data["cifar"]["test"][1]])
    assert sorted(p["train_idx"].tolist()) == list(range(CIFAR_TRAIN))     # every training row, training
    assert p["test_idx"].min() >= CIFAR_TRAIN                               # test rows from the test split only
    assert np.all(np.diff(p["test_ptr"]) >= 1)
    for a in range(10):
        train = set(labels[_rows(p["train_ptr"], p["train_idx"], a)].tolist())
        assert set(labels[_rows(p["test_ptr"], p["test_idx"], a)].tolist()) <= train, a
    # the DatasetDict saved to disk is the same data: the same partition
    pop = _population(data["root"] / "cifar", **CIFAR)
    assert np.array_equal(pop.partition.train_idx, p["train_idx"])
    assert np.array_equal(pop.partition.test_idx, p["test_idx"])
    pixels = data["cifar"]["test"][0]
    assert pop.ds.x.shape == (CIFAR_TRAIN + CIFAR_TEST, 3, 32, 32)
    expected = pixels[3].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(pop.ds.x[[CIFAR_TRAIN + 3]][0], expected)


@pytest.mark.parametrize("scheme", ["shards", "dirichlet", "iid", "virtual-shards", "virtual-dirichlet"])
def test_every_partition_works_on_a_hf_dataset(data, scheme):
    import torch
    pop = _population(data["root"] / "cifar", **{**CIFAR, "data__partition": scheme, "data__samples_per_agent": 12})
    ids = np.array([0, 3], dtype=np.int64)
    if pop.resident:
        block = pop.resident_block(0, 2, torch.device("cpu"), torch.float32)
        assert np.all(np.diff(pop.partition.test_ptr) >= 1)
        assert pop.partition.test_idx.min() >= CIFAR_TRAIN        # the test split is the pooled test set
        assert pop.ds.x.converted == block.X_train.shape[0] + block.X_test.shape[0]
    else:
        block = pop.build(ids, torch.device("cpu"), torch.float32, population.widths(pop, ids))
        assert pop.ds.x.shape[0] == CIFAR_TRAIN                    # virtual agents draw from the train split
    assert block.X_train.shape[1:] == (3, 32, 32) and 0 <= block.X_train.min() and block.X_train.max() <= 1


# --------------------------------------------------------------------------- Shakespeare-like
def _expected_ids(texts):
    return np.array([[VOCAB.find(c) if c in VOCAB else len(VOCAB) for c in t] for t in texts], dtype=np.int64)


def test_shakespeare_csv_natural_temporal_split_and_unknown_characters(data, tmp_path):
    shake, owner = data["shakespeare"]
    proc, out = _cli(data, data["root"] / "shakespeare_csv", tmp_path, **SHAKESPEARE)
    assert_ok(proc)
    notice = [line for line in proc.stderr.splitlines() if "notice" in line]
    assert len(notice) == 1, proc.stderr
    assert ("11 in column 'x' and 2 in column 'y' character(s) not in data.vocab (80 characters) map to the "
            "reserved id 80") in notice[0]
    p = _partition(out)
    speaker = np.array(SPEAKERS)[owner]
    for a, name in enumerate(sorted(SPEAKERS)):
        rows = np.flatnonzero(speaker == name)                  # the speaker's rows, in time order
        n_test = min(max(int(np.floor(0.2 * rows.shape[0] + 0.5)), 1), rows.shape[0] - 1)
        assert _rows(p["test_ptr"], p["test_idx"], a).tolist() == rows[-n_test:].tolist(), a
        assert _rows(p["train_ptr"], p["train_idx"], a).tolist() == rows[:-n_test].tolist(), a
    assert (81,) in [v.shape for v in final_model(out).values()]     # 80 characters + the unknown one


def test_shakespeare_characters_become_vocabulary_ids(data):
    shake, owner = data["shakespeare"]
    for d in ("shakespeare", "shakespeare_csv"):
        pop = _population(data["root"] / d, **SHAKESPEARE)
        x = pop.ds.x
        assert x.shape == (len(shake), 80) and x.dtype == np.int64 and pop.num_classes == 81
        assert np.array_equal(x[np.arange(len(shake))], _expected_ids(shake["x"]))
        assert np.array_equal(pop.ds.y, _expected_ids(shake["y"])[:, 0])
        assert pop.ds.temporal


# --------------------------------------------------------------------------- other columns and splits
def test_arrays_and_a_natural_test_split_with_the_agent_column(tmp_path):
    """2-D uint8 arrays → (1, H, W) / 255, 1-D float arrays as they are; integer agents and labels; the test
    split of a natural partition holds the agents' test samples."""
    rng = np.random.default_rng(3)
    parts, raw = {}, {}
    for split, n in (("train", 30), ("test", 9)):
        agents = np.arange(n) % 3 * 10 + 5                       # agents 5, 15, 25
        grid = rng.integers(0, 256, (n, 4, 6), dtype=np.uint8)
        vec = rng.normal(size=(n, 3))
        parts[split] = datasets.Dataset.from_dict({"grid": grid.tolist(), "vec": vec.tolist(),
                                                   "label": (np.arange(n) % 4).tolist(), "who": agents.tolist()})
        raw[split] = grid, vec
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "arrays"))
    base = dict(data__label="label", data__agent_column="who", data__partition="natural", data__num_agents=0,
                train__agents_per_round=2)
    grid = _population(tmp_path / "arrays", data__features="grid", **base)
    assert grid.input_shape == (1, 4, 6) and grid.num_classes == 4 and grid.num_agents == 3
    assert np.array_equal(grid.ds.x[[31]][0, 0], raw["test"][0][1].astype(np.float32) / np.float32(255))
    p = grid.partition
    for a in range(3):
        assert (_rows(p.test_ptr, p.test_idx, a) - 30).tolist() == list(range(a, 9, 3))
        assert _rows(p.train_ptr, p.train_idx, a).tolist() == list(range(a, 30, 3))
    vec = population.make_population(_cfg(tmp_path / "arrays", data__features="vec", train__dtype="float64",
                                          **base).data, 0, "float64")
    assert vec.input_shape == (3,) and vec.ds.x.dtype == np.float64
    assert np.array_equal(vec.ds.x[[2, 35]], np.stack([raw["train"][1][2], raw["test"][1][5]]))


def test_rows_follow_a_splits_indices_mapping(data):
    fem, _, labels, _ = data["femnist"]
    picked = fem.select([7, 2, 40, 2])
    column, perm = hf._column(picked, "character")
    assert perm is not None
    rows = hf.ArrowRows([column], [perm], lambda c: np.asarray(c.to_pylist())[:, None], (1,), np.int64, "labels")
    assert rows[[3, 0, 1]][:, 0].tolist() == [labels[2], labels[7], labels[2]] and rows.converted == 3
    assert hf._full(picked, "character").to_pylist() == [labels[i] for i in (7, 2, 40, 2)]


# --------------------------------------------------------------------------- errors
def test_a_missing_column_is_one_line_listing_the_columns(data, tmp_path):
    proc, _ = _cli(data, data["root"] / "femnist", tmp_path, **{**FEMNIST, "data__label": "charactr"})
    assert_one_error_line(proc, 2, "no column 'charactr' (data.label)", "its columns: image, character, writer_id")


def test_offline_without_cache_is_one_line_naming_the_dataset_and_the_cache(tmp_path):
    home = tmp_path / "empty_home"
    proc = run_cli(["run", _empty_config(tmp_path)] + sets(data__dataset="hf:flwrlabs/femnist",
                                                          output__dir=str(tmp_path / "o"), **FEMNIST),
                   env={"HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1"}, timeout=60)
    line = assert_one_error_line(proc, 2, "hf:flwrlabs/femnist", str(home / "datasets"), "HF_DATASETS_OFFLINE=1")
    assert "Traceback" not in proc.stderr, line


def test_an_unreachable_hub_is_offline_at_once(tmp_path):
    """No offline setting, but no connection (a closed port): the cache is used, and it is empty."""
    home = tmp_path / "empty_home"
    proc = run_cli(["run", _empty_config(tmp_path)] + sets(data__dataset="hf:flwrlabs/femnist",
                                                          output__dir=str(tmp_path / "o"), **FEMNIST),
                   env={"HF_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_OFFLINE": "",
                        "HF_HUB_OFFLINE": ""}, timeout=60)
    assert_one_error_line(proc, 2, "hf:flwrlabs/femnist", str(home / "datasets"), "no connection to 127.0.0.1:9")
    assert proc.elapsed < 30


def test_without_datasets_installed_is_one_line_naming_the_extra(data, tmp_path):
    shim = tmp_path / "shim" / "datasets"
    os.makedirs(shim)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'datasets'\")\n")
    proc, _ = _cli(data, data["root"] / "femnist", tmp_path, env={"PYTHONPATH": str(tmp_path / "shim")}, **FEMNIST)
    assert_one_error_line(proc, 2, "pip install -e '.[hf]'")


@pytest.mark.parametrize("values, words", [
    (dict(data__partition="natural", data__num_agents=0), "needs data.agent_column"),
    (dict(data__test_split="last"), "data.test_split = 'last' applies to data.partition = 'natural' only"),
    (dict(data__min_samples=5), "data.min_samples = 5 applies to data.partition = 'natural' only"),
    (dict(data__vocab="abca"), "data.vocab = 'abca': must be a non-empty string of distinct characters"),
    (dict(data__features="label"), "must name different columns"),
])
def test_bad_hf_keys_are_config_errors(values, words):
    with pytest.raises(config.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _cfg("some/data", **{**dict(train__agents_per_round=2), **values})


@pytest.mark.parametrize("name", ["femnist", "cifar10", "shakespeare"])
def test_the_ready_configs_are_valid(name, repo_root):
    from mpifedmeta import models
    if name == "shakespeare" and "char-lstm" not in models.MODELS:
        pytest.skip("model char-lstm is not registered")
    cfg = config.load(os.path.join(repo_root, "configs", f"{name}.toml"))
    assert hf.is_hf(cfg.data.dataset)


def test_the_default_vocabulary_is_leafs():
    assert len(VOCAB) == 80 and config.LEAF_VOCAB == VOCAB
    assert config.load(None, []).data.vocab == VOCAB
    assert config.load(None, ["data.dataset=hf:x"]).data.dataset == "hf:x"
