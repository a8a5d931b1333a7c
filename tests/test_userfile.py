"""A model and a dataset from the user's own file (``model.name = "file.py:build"``, ``data.dataset =
"file.py:load"``; mpifedmeta/userfile.py, data/user.py): every error is one line naming the key and
the file; the example (configs/user-model.toml) runs with the default configuration on the stacked
path, bit-identically on 1, 2 and 3 ranks, and its meta-gradient equals the per-agent reference; a
model that cannot be lifted runs on vmap and says why; BatchNorm is refused (exit 2)."""

from __future__ import annotations

import os
import re
import textwrap

import numpy as np
import pytest
import torch

from helpers import (REPO, assert_models_identical, assert_ok, assert_one_error_line, describe, final_model, run_cli,
                     sets, write_tiny_config)
from mpifedmeta import userfile
from mpifedmeta.engine import backends
from mpifedmeta.run import config
from mpifedmeta.core import metagrad as mg
from mpifedmeta.core import reference
import engine_api as api
from mpifedmeta.data import DataError, load_dataset
from mpifedmeta.models import build_model, param_dict

EXAMPLE = os.path.join(REPO, "configs", "user-model.toml")
MODEL = "examples/tanh_resnet.py:build"
DATASET = "examples/my_dataset.py:load"


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """
    import torch
    from torch import nn

    def build(in_shape, num_classes, hidden):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), num_classes))

    def not_a_module(in_shape, num_classes, hidden):
        return [1, 2]

    def no_params(in_shape, num_classes, hidden):
        return nn.Flatten()

    def fails(in_shape, num_classes, hidden):
        raise RuntimeError("width must be even")

    VALUE = 3
"""


# --------------------------------------------------------------------------- resolving a function

def test_resolve_file_and_module(tmp_path, monkeypatch):
    path = write(tmp_path, "good.py", GOOD)
    assert callable(userfile.resolve(f"{path}:build", "model.name"))
    assert userfile.resolve("mpifedmeta.models:_build_mlp", "model.name") is not None
    monkeypatch.chdir(tmp_path)                           # relative to the current directory
    assert userfile.resolve("good.py:build", "model.name")((6,), 3, None) is not None
    assert userfile.resolve("./good.py:build", "model.name") is userfile.resolve("good.py:build", "model.name")


RESOLVE_ERRORS = {
    "missing.py:build": "model.name = 'missing.py:build': file missing.py not found (relative paths are relative to the current directory",
    "notes.txt:build": "model.name = 'notes.txt:build': notes.txt is not a .py file",
    "good.py:nope": "model.name = 'good.py:nope': good.py has no function 'nope' (it defines: build, fails, no_params, not_a_module)",
    "good.py:VALUE": "model.name = 'good.py:VALUE': 'VALUE' in good.py is a int, not a function",
    "good.py:": "model.name = 'good.py:': expected FILE.py:FUNCTION or package.module:FUNCTION",
    "broken.py:build": "model.name = 'broken.py:build': cannot import broken.py: SyntaxError: ",
    "raises.py:build": "model.name = 'raises.py:build': importing raises.py raised ModuleNotFoundError: No module named 'not_installed_xyz'",
    "no_such_pkg.mod:build": "model.name = 'no_such_pkg.mod:build': cannot import module 'no_such_pkg.mod': ModuleNotFoundError: No module named 'no_such_pkg'",
    "mpifedmeta.models:nope": "model.name = 'mpifedmeta.models:nope': mpifedmeta.models has no function 'nope'",
}


@pytest.mark.parametrize("spec", list(RESOLVE_ERRORS))
def test_resolve_errors_are_one_line(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "notes.txt", "hello")
    write(tmp_path, "broken.py", "def build(:\n")
    write(tmp_path, "raises.py", "import not_installed_xyz\n")
    with pytest.raises(userfile.UserFileError) as e:
        userfile.resolve(spec, "model.name")
    msg = str(e.value)
    assert msg.startswith(RESOLVE_ERRORS[spec]) and "\n" not in msg, msg


BUILD_ERRORS = {
    "not_a_module": "the builder returned a list, not a torch.nn.Module",
    "no_params": "the model has no parameters",
    "fails": "fails((1, 8, 8), 10, (16,)) raised RuntimeError: width must be even",
}


@pytest.mark.parametrize("fn", list(BUILD_ERRORS))
def test_builder_errors_are_one_line(fn, tmp_path):
    path = write(tmp_path, "good.py", GOOD)
    with pytest.raises(config.ConfigError) as e:
        build_model(f"{path}:{fn}", (1, 8, 8), 10, [16])
    assert str(e.value) == f"model.name = '{path}:{fn}': {BUILD_ERRORS[fn]}"


def test_config_validation_accepts_user_files_and_names_the_key(tmp_path):
    path = write(tmp_path, "good.py", GOOD)
    cfg = config.load(None, [f'model.name="{path}:build"', f'data.dataset="{REPO}/{DATASET}"'])
    assert cfg.model.name == f"{path}:build"                       # stored as given
    with pytest.raises(config.ConfigError, match=r"^model.name = '.*good.py:nope': .*good.py has no function 'nope'"):
        config.load(None, [f'model.name="{path}:nope"'])
    with pytest.raises(config.ConfigError, match=r"^data.dataset = 'nowhere.py:load': file nowhere.py not found"):
        config.load(None, ['data.dataset="nowhere.py:load"'])
    with pytest.raises(config.ConfigError, match=r"must be one of linear, mlp, cnn, char-lstm, transformer or FILE.py:FUNCTION"):
        config.load(None, ['model.name="resnet"'])


# --------------------------------------------------------------------------- a dataset from a file

LOADERS = """
    import numpy as np
    from mpifedmeta.data import Dataset

    def x_y(n=60):
        rng = np.random.default_rng(0)
        return rng.normal(size=(n, 5)), np.arange(n) % 3

    def as_dict(path, dtype):
        x, y = x_y()
        return {"x": x, "y": y}

    def as_dataset(path, dtype):
        x, y = x_y()
        return Dataset(x=x.astype(np.float32), y=y, num_classes=4, name="mine")

    def natural(path, dtype):
        x, y = x_y()
        return {"x": x, "y": y, "agent": np.arange(60) % 5, "test": np.arange(60) % 4 == 0}

    def wrong_type(path, dtype):
        return [1, 2, 3]

    def no_y(path, dtype):
        return {"x": np.zeros((4, 2))}

    def float_labels(path, dtype):
        x, y = x_y()
        return {"x": x, "y": y.astype(float)}

    def short_labels(path, dtype):
        x, y = x_y()
        return {"x": x, "y": y[:10]}

    def nan_features(path, dtype):
        x, y = x_y()
        x[3, 1] = np.nan
        return {"x": x, "y": y}

    def too_few_classes(path, dtype):
        x, y = x_y()
        return Dataset(x=x, y=y, num_classes=2, name="bad")

    def raises(path, dtype):
        raise OSError("no such directory: " + path)
"""


def test_dataset_from_a_file(tmp_path):
    path = write(tmp_path, "loaders.py", LOADERS)
    ds = load_dataset(f"{path}:as_dict", "", "float64")
    assert ds.x.dtype == np.float64 and ds.num_classes == 3 and ds.y.dtype == np.int64 and ds.agent is None
    assert load_dataset(f"{path}:as_dict", "", "float32").x.dtype == np.float32
    ds = load_dataset(f"{path}:as_dataset", "")
    assert ds.num_classes == 4 and ds.name == "mine"
    ds = load_dataset(f"{path}:natural", "")
    assert ds.agent.dtype == np.int64 and ds.test.dtype == bool


DATA_ERRORS = {
    "wrong_type": "the loader returned a list; expected an mpifedmeta.data.Dataset or a mapping with keys 'x' and 'y'",
    "no_y": "the returned mapping has no key 'y' (found: ['x'])",
    "float_labels": "key 'y' must have an integer dtype, got float64",
    "short_labels": "key 'y' must have shape (60,) to match 'x', got (10,)",
    "nan_features": "key 'x' contains NaN or inf",
    "too_few_classes": "label 2 is out of range for num_classes = 2 (labels must be 0..num_classes-1)",
    "raises": "raises('/data', dtype('float32')) raised OSError: no such directory: /data",
}


@pytest.mark.parametrize("fn", list(DATA_ERRORS))
def test_dataset_errors_are_one_line(fn, tmp_path):
    path = write(tmp_path, "loaders.py", LOADERS)
    with pytest.raises(DataError) as e:
        load_dataset(f"{path}:{fn}", "/data" if fn == "raises" else "")
    msg = str(e.value)
    assert msg.startswith(f"data.dataset = '{path}:{fn}': {DATA_ERRORS[fn]}") and "\n" not in msg, msg


# --------------------------------------------------------------------------- the example, in-process

def test_example_model_lifts_and_its_meta_gradient_equals_the_per_agent_reference(monkeypatch):
    monkeypatch.chdir(REPO)
    ds = load_dataset(DATASET, "", "float64")
    assert ds.x.shape == (1200, 1, 8, 8) and ds.x.dtype == np.float64 and ds.num_classes == 6
    torch.manual_seed(0)
    model = build_model(MODEL, ds.x.shape[1:], ds.num_classes, [16]).double().requires_grad_(False)
    assert backends.resolve("stacked", model) == ("stacked", "stacked")
    B, nu = 3, 2
    params = {k: v.unsqueeze(0) + 0.05 * torch.randn((B,) + v.shape, dtype=torch.float64)
              for k, v in param_dict(model).items()}
    X, Y = torch.from_numpy(ds.x[:120]), torch.from_numpy(ds.y[:120])
    idx = torch.randint(0, 120, (B, mg.num_slots(nu, "exact"), 8))
    mask = torch.ones(idx.shape, dtype=torch.float64)
    mask[2, :, 5:] = 0
    meta = mg.MetaSpec(nu, 0.05, "exact")
    loss = reference.make_loss(model)
    for strategy in ("stacked", "vmap"):
        g, _ = api.block_meta_gradients(backends.make(model, strategy), params, X, Y, idx, mask, meta)
        for a in range(B):
            ref, _ = reference.agent_meta_gradient_autograd(loss, {k: p[a] for k, p in params.items()}, X, Y, idx[a],
                                                     mask[a], nu, 0.05, "exact", 1e-3)
            fa = torch.cat([g[k][a].reshape(-1) for k in params])
            fr = torch.cat([ref[k].reshape(-1) for k in params])
            assert float((fa - fr).norm() / fr.norm()) <= 1e-12, strategy


# --------------------------------------------------------------------------- the command line

STARTUP = re.compile(r"^mpifedmeta \S+: .* strategy (.*)$", re.M)


def test_example_config_runs_stacked_and_bit_identical_on_1_2_3_ranks(tmp_path):
    models = {}
    for P in (1, 2, 3):
        out = str(tmp_path / f"P{P}")
        proc = run_cli(["run", EXAMPLE] + sets(train__rounds=3, eval__every=3, output__dir=out), np_=P)
        assert_ok(proc)
        assert STARTUP.search(proc.stdout).group(1) == "stacked", describe(proc)
        assert f"on {P} rank(s), {MODEL} with " in proc.stdout
        models[P] = final_model(out)
    for P in (2, 3):
        assert_models_identical(models[1], models[P], f"final model P=1 vs P={P}")


UNLIFTABLE = """
    import torch
    from torch import nn

    class Sorted(nn.Module):
        def __init__(self, features, num_classes):
            super().__init__()
            self.fc = nn.Linear(features, num_classes)

        def forward(self, x):
            return self.fc(torch.sort(x.flatten(1), dim=1).values)

    def build(in_shape, num_classes, hidden):
        return Sorted(64, num_classes)

    def batchnorm(in_shape, num_classes, hidden):
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, num_classes))

    class Branching(nn.Module):        # data-dependent control flow: neither torch.fx nor vmap can run it
        def __init__(self, features, num_classes):
            super().__init__()
            self.fc = nn.Linear(features, num_classes)

        def forward(self, x):
            x = x.flatten(1)
            if x.sum() > 0:
                x = 2 * x
            return self.fc(x)

    def branching(in_shape, num_classes, hidden):
        return Branching(64, num_classes)
"""


def test_unliftable_user_model_with_the_default_strategy_runs_on_vmap_and_says_why(tmp_path):
    path, cfg = write(tmp_path, "sorted_model.py", UNLIFTABLE), write_tiny_config(tmp_path)
    for P in (1, 2):
        proc = run_cli(["run", cfg, "--set", f'model.name="{path}:build"'] +
                       sets(train__rounds=2, output__dir=str(tmp_path / f"out{P}")), np_=P)
        assert_ok(proc)
        assert STARTUP.search(proc.stdout).group(1) == \
            "vmap (stacked form not derivable: torch.sort at node 'sort')", describe(proc)
    assert_models_identical(final_model(str(tmp_path / "out1")), final_model(str(tmp_path / "out2")))


def test_model_that_vmap_cannot_run_runs_on_the_loop_and_says_why(tmp_path):
    """Data-dependent control flow: the default strategy ends on the per-agent loop (bit-identical on
    1 and 2 ranks); an explicit train.strategy = "vmap" is exit 2 with one line and writes nothing."""
    path, cfg = write(tmp_path, "branching_model.py", UNLIFTABLE), write_tiny_config(tmp_path)
    for P in (1, 2):
        proc = run_cli(["run", cfg, "--set", f'model.name="{path}:branching"'] +
                       sets(train__rounds=2, output__dir=str(tmp_path / f"out{P}")), np_=P)
        assert_ok(proc)
        line = STARTUP.search(proc.stdout).group(1)
        assert line.startswith("loop (vmap (stacked form not derivable: torch.fx cannot trace") and \
            "cannot run the model: vmap: " in line, describe(proc)
    assert_models_identical(final_model(str(tmp_path / "out1")), final_model(str(tmp_path / "out2")))
    out = tmp_path / "vmap"
    proc = run_cli(["run", cfg, "--set", f'model.name="{path}:branching"', "--set", "train.strategy=vmap",
                    "--set", f'output.dir="{out}"'], np_=2)
    assert_one_error_line(proc, 2, "train.strategy = 'vmap' cannot run this model (vmap: ", 'use train.strategy = "loop"')
    assert not out.exists()


def test_batchnorm_and_missing_files_exit_2_with_one_line(tmp_path):
    path, cfg = write(tmp_path, "sorted_model.py", UNLIFTABLE), write_tiny_config(tmp_path)
    proc = run_cli(["run", cfg, "--set", f'model.name="{path}:batchnorm"', "--set", "train.strategy=vmap",
                    "--set", f'output.dir="{tmp_path / "bn"}"'], np_=2)
    assert_one_error_line(proc, 2, f"model.name = '{path}:batchnorm': BatchNorm2d at '1' keeps running statistics, "
                                   "which are not part of the meta-objective; use GroupNorm or LayerNorm")
    proc = run_cli(["run", cfg, "--set", 'model.name="nowhere/model.py:build"', "--set", f'output.dir="{tmp_path / "x"}"'])
    assert_one_error_line(proc, 2, "model.name = 'nowhere/model.py:build': file nowhere/model.py not found")
    proc = run_cli(["run", cfg, "--set", f'data.dataset="{path}:build"', "--set", f'output.dir="{tmp_path / "y"}"'])
    assert_one_error_line(proc, 2, f"data.dataset = '{path}:build': build(")
