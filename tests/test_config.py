"""mpifedmeta.run.config: defaults, validation (one line naming the key), --set parsing, JSON round trip."""

import json
import os

import numpy as np
import pytest

from mpifedmeta.run import config
from mpifedmeta.run.config import SCHEMA, ConfigError, apply_overrides, from_json, load, parse_value, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=5"]


def config_error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.strip(), "empty message"
    return msg


# --------------------------------------------------------------------------- defaults

def test_defaults_validate_and_are_complete():
    cfg = load(None, [])
    assert set(cfg.raw) == set(SCHEMA)
    for sec, keys in SCHEMA.items():
        assert set(cfg.raw[sec]) == set(keys), sec
        for k, key in keys.items():
            got = cfg.raw[sec][k]
            want = float(key.default) if float in key.types and isinstance(key.default, int) else key.default
            assert got == want, f"{sec}.{k}"
    assert validate({}).raw == cfg.raw
    # attribute access
    assert cfg.train.nu == SCHEMA["train"]["nu"].default
    assert cfg.data.dataset == "digits"
    with pytest.raises(AttributeError):
        cfg.nosuchsection


def test_defaults_are_not_shared_between_configs():
    a = load(None, [])
    a.raw["model"]["hidden"].append(999)
    assert load(None, []).raw["model"]["hidden"] == SCHEMA["model"]["hidden"].default
    assert 999 not in SCHEMA["model"]["hidden"].default


def test_quickstart_config_validates():
    cfg = load(os.path.join(REPO, "configs", "quickstart.toml"))
    assert cfg.data.dataset == "digits"
    assert cfg.train.agents_per_round <= cfg.data.num_agents - cfg.data.holdout_agents


def test_int_given_for_float_key_becomes_float():
    cfg = load(None, ["train.alpha=1", "train.beta=2"])
    assert isinstance(cfg.train.alpha, float) and cfg.train.alpha == 1.0
    assert isinstance(cfg.train.beta, float) and cfg.train.beta == 2.0


def test_describe_lists_every_key():
    text = config.describe()
    for sec, keys in SCHEMA.items():
        assert f"[{sec}]" in text
        for k, key in keys.items():
            unset = "# " if key.default is None else ""      # unset by default: listed commented out
            assert f"\n{unset}{k} = " in text, f"{sec}.{k}"


# --------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("overrides, names", [
    (["train.nu=-1"], ["train.nu"]),
    (["train.alpha=0"], ["train.alpha"]),
    (["train.alpha=-0.5"], ["train.alpha"]),
    (["train.beta=0"], ["train.beta"]),
    (["train.rounds=-3"], ["train.rounds"]),
    (["train.local_steps=0"], ["train.local_steps"]),
    (["train.batch_size=foo"], ["train.batch_size"]),
    (["train.batch_size=\"foo\""], ["train.batch_size"]),
    (["train.batch_size=0"], ["train.batch_size"]),
    (["train.metagrad=second"], ["train.metagrad"]),
    (["train.dtype=float16"], ["train.dtype"]),
    (["train.weighting=size"], ["train.weighting"]),
    (["data.dataset=cifar"], ["data.dataset"]),
    (["data.partition=random"], ["data.partition"]),
    (["data.test_fraction=1.0"], ["data.test_fraction"]),
    (["data.test_fraction=0.0"], ["data.test_fraction"]),
    (["model.name=resnet"], ["model.name"]),
    (["model.hidden=[16, 0]"], ["model.hidden"]),
    (["eval.finetune_steps=[]"], ["eval.finetune_steps"]),
    (["eval.finetune_steps=[0, -1]"], ["eval.finetune_steps"]),
    (["eval.every=0"], ["eval.every"]),
    (["eval.agents=some"], ["eval.agents"]),
    (["output.keep=0"], ["output.keep"]),
    (["output.checkpoint_every=0"], ["output.checkpoint_every"]),
])
def test_bad_value_names_the_key(overrides, names):
    msg = config_error(SMALL + overrides)
    for n in names:
        assert n in msg, msg


@pytest.mark.parametrize("overrides, key", [
    (["train.nu=\"three\""], "train.nu"),
    (["train.nu=three"], "train.nu"),
    (["train.rounds=2.5"], "train.rounds"),
    (["train.rounds=true"], "train.rounds"),          # bool is not an int here
    (["train.alpha=\"0.1\""], "train.alpha"),
    (["train.alpha=false"], "train.alpha"),
    (["model.hidden=16"], "model.hidden"),
    (["data.num_agents=[12]"], "data.num_agents"),
    (["data.dataset=3"], "data.dataset"),
    (["train.batch_size=1.5"], "train.batch_size"),
])
def test_wrong_type_names_the_key(overrides, key):
    msg = config_error(SMALL + overrides)
    assert key in msg, msg
    assert "type" in msg, msg


def test_unknown_section_from_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nnu = 2\n")
    msg = config_error([], str(p))
    assert "trian" in msg and "section" in msg


def test_unknown_key_from_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nnuu = 2\n")
    msg = config_error([], str(p))
    assert "train.nuu" in msg


def test_section_that_is_not_a_table(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("train = 3\n")
    assert "train" in config_error([], str(p))


def test_unknown_section_and_key_from_set():
    assert "trian" in config_error(["trian.nu=2"])
    assert "train.nuu" in config_error(["train.nuu=2"])


@pytest.mark.parametrize("item", ["train.nu", "nu=3", "train.nu.x=3", ".nu=3", "train.=3"])
def test_malformed_set(item):
    msg = config_error([item])
    assert item.split("=")[0] in msg


def test_agents_per_round_exceeds_training_agents():
    load(None, ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=10"])  # boundary ok
    msg = config_error(["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=11"])
    assert "train.agents_per_round" in msg and "10" in msg


@pytest.mark.parametrize("holdout", [12, 13])
def test_holdout_not_below_num_agents(holdout):
    msg = config_error(["data.num_agents=12", f"data.holdout_agents={holdout}", "train.agents_per_round=1"])
    assert "data.holdout_agents" in msg


def test_num_agents_zero_needs_natural():
    assert "data.num_agents" in config_error(["data.num_agents=0"])


def test_natural_needs_npz():
    assert "data.partition" in config_error(SMALL + ["data.partition=natural"])


def test_npz_without_path():
    msg = config_error(SMALL + ["data.dataset=npz"])
    assert "data.path" in msg


def test_npz_path_missing(tmp_path):
    missing = str(tmp_path / "nope.npz")
    msg = config_error(SMALL + ["data.dataset=npz", f"data.path={json.dumps(missing)}"])
    assert "data.path" in msg and "nope.npz" in msg


def test_npz_path_present_is_accepted(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 2)), y=np.zeros(4, dtype=np.int64))
    cfg = load(None, SMALL + ["data.dataset=npz", f"data.path={json.dumps(str(p))}"])
    assert cfg.data.path == str(p)


def test_fashion_mnist_directory_missing(tmp_path):
    msg = config_error(SMALL + ["data.dataset=fashion-mnist", f"data.path={json.dumps(str(tmp_path / 'nodir'))}"])
    assert "data.path" in msg


def test_hf_delta_too_small_for_float32():
    assert "train.hf_delta" in config_error(SMALL + ["train.metagrad=hf", "train.hf_delta=1e-7"])
    cfg = load(None, SMALL + ["train.metagrad=hf", "train.hf_delta=1e-7", "train.dtype=float64"])
    assert cfg.train.hf_delta == 1e-7


def test_bad_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[data\nnum_agents = \n")
    msg = config_error([], str(p))
    assert str(p) in msg and "TOML" in msg


def test_missing_config_file(tmp_path):
    p = str(tmp_path / "missing.toml")
    msg = config_error([], p)
    assert p in msg and "not found" in msg


def test_config_file_is_a_directory(tmp_path):
    msg = config_error([], str(tmp_path))
    assert str(tmp_path) in msg


def test_validate_rejects_non_table():
    with pytest.raises(ConfigError):
        validate([1, 2])


# --------------------------------------------------------------------------- --set parsing

@pytest.mark.parametrize("text, value", [
    ("3", 3),
    ("-2", -2),
    ("0.5", 0.5),
    ("1e-3", 1e-3),
    ("2.5e2", 250.0),
    ("[16, 8]", [16, 8]),
    ("[]", []),
    ("true", True),
    ("mlp", "mlp"),
    ('"mlp"', "mlp"),
    ("'mlp'", "mlp"),
    ("full", "full"),
    ('"full"', "full"),
    ("runs/a b", "runs/a b"),
    ('"runs/x.y"', "runs/x.y"),
    ("runs/x.y", "runs/x.y"),
])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_set_types_reach_the_config():
    cfg = load(None, SMALL + ["train.nu=3", "train.alpha=0.5", "model.hidden=[16, 8]", "train.batch_size=full",
                              "model.name=linear", 'train.metagrad="fo"', "output.dir=runs/x-1",
                              "eval.finetune_steps=[0, 5]", "train.dtype=float64"])
    assert cfg.train.nu == 3 and isinstance(cfg.train.nu, int)
    assert cfg.train.alpha == 0.5
    assert cfg.model.hidden == [16, 8]
    assert cfg.train.batch_size == "full"
    assert cfg.model.name == "linear"
    assert cfg.train.metagrad == "fo"
    assert cfg.output.dir == "runs/x-1"
    assert cfg.eval.finetune_steps == [0, 5]
    assert cfg.train.dtype == "float64"


def test_set_batch_size_int():
    cfg = load(None, SMALL + ["train.batch_size=7"])
    assert cfg.train.batch_size == 7 and isinstance(cfg.train.batch_size, int)


def test_set_whitespace_and_equals_in_value():
    cfg = load(None, SMALL + [" train.nu = 4 ", "output.dir=runs/a=b"])
    assert cfg.train.nu == 4
    assert cfg.output.dir == "runs/a=b"


def test_set_overrides_the_file_and_last_wins(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nnu = 2\nseed = 5\n[data]\nnum_agents = 12\nholdout_agents = 2\n")
    cfg = load(str(p), ["train.nu=3", "train.nu=4", "train.agents_per_round=5"])
    assert cfg.train.nu == 4 and cfg.train.seed == 5 and cfg.data.num_agents == 12


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"nu": 1}}
    out = apply_overrides(raw, ["train.nu=2"])
    assert raw == {"train": {"nu": 1}} and out["train"]["nu"] == 2


# --------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("overrides", [
    [],
    SMALL + ["train.batch_size=full", "model.hidden=[16]", "train.alpha=1", "eval.agents=3",
             "train.dtype=float64", "train.weighting=samples", "data.partition=dirichlet"],
])
def test_resolved_config_round_trips_through_json(overrides):
    cfg = load(None, overrides)
    text = cfg.to_json()
    again = from_json(text)
    assert again.raw == cfg.raw
    assert again.to_json() == text
    assert json.loads(text) == cfg.raw
    # types survive: ints stay ints, floats stay floats
    for sec in cfg.raw:
        for k, v in cfg.raw[sec].items():
            assert type(again.raw[sec][k]) is type(v), f"{sec}.{k}"


def test_with_values_validates():
    cfg = load(None, SMALL)
    assert cfg.with_values(train={"nu": 3}).train.nu == 3
    assert cfg.train.nu != 3 or SCHEMA["train"]["nu"].default == 3
    with pytest.raises(ConfigError):
        cfg.with_values(train={"nu": -1})


# --------------------------------------------------------------------------- registries and key flags

def test_names_come_from_the_registries(monkeypatch):
    from mpifedmeta import models
    from mpifedmeta.core import metagrad
    from mpifedmeta.engine import backends
    from mpifedmeta.data import loaders, partition
    for registry, key in ((loaders.LOADERS, "data.dataset"), (partition.SCHEMES, "data.partition"),
                          (models.MODELS, "model.name"), (metagrad.METHODS, "train.metagrad")):
        assert f"must be one of {', '.join(registry)}" in config_error(SMALL + [f"{key}=nope"])
    assert "must be one of auto, " + ", ".join(backends.BACKENDS) in config_error(SMALL + ["train.strategy=nope"])
    # a new registration is accepted without touching config.py, and `mpifedmeta config` lists it
    monkeypatch.setitem(models.MODELS, "tiny", models.MODELS["linear"])
    assert load(None, SMALL + ["model.name=tiny"]).model.name == "tiny"
    assert "linear | mlp | cnn | char-lstm | transformer | tiny" in config.describe()


def test_key_flags():
    run_only = {"train": ("strategy", "chunk", "memory_budget", "recompute", "compile", "device", "threads", "agent_chunk"),
                "eval": ("chunk",), "output": ("dir", "checkpoint_every", "keep", "progress_every", "tensorboard")}
    resumable = config.keys_where("resumable")
    not_experiment = config.keys_where("experiment", False)
    for sec in SCHEMA:
        assert set(resumable[sec]) == set(run_only.get(sec, ())) | ({"rounds"} if sec == "train" else set()), sec
        assert set(not_experiment[sec]) == set(run_only.get(sec, ())) | ({"seed"} if sec == "train" else set()), sec
