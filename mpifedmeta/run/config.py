"""Configuration: a TOML file plus ``--set section.key=value`` overrides, validated once.

Every problem is reported as one line naming the key; the CLI exits with code 2.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import stat
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MAX_AGENTS = 2**31 - 1          # agent ids are hashed as 32-bit counters (rng.py)
MAX_EVALUATED = 100_000         # generated populations: agents evaluated per evaluation, at most
COMPILE_MODES = ("off", "compile", "cudagraphs")   # train.compile as a string (booleans: off / compile)
MAX_CONFIG_BYTES = 1 << 20


from mpifedmeta.errors import ConfigError  # noqa: F401


@dataclass(frozen=True)
class Key:
    default: object
    types: tuple
    check: object = None      # callable(value) -> error text or None
    doc: str = ""             # "{choices}" is replaced by the registered names (see Registered)
    resumable: bool = False   # may change when a run is resumed (bookkeeping, never the results)
    experiment: bool = True   # defines the experiment: the report groups runs that differ only in the others


class Registered:
    """Check that a value names an entry of a registry (e.g. ``models.MODELS``), plus ``extra`` names.

    The registry is read at validation time, so a new registration needs no edit here and
    ``import mpifedmeta.run.config`` stays free of torch.
    """

    def __init__(self, module: str, registry: str, extra: tuple[str, ...] = (),
                 also: tuple[tuple[str, str], ...] = (), files: bool = False):   # files: also "file.py:function"
        self.module, self.registry, self.extra, self.also, self.files = module, registry, extra, also, files

    def names(self) -> tuple[str, ...]:
        sources = ((self.module, self.registry),) + self.also     # also: more (module, registry) pairs
        return self.extra + tuple(name for module, registry in sources
                                  for name in getattr(importlib.import_module(module), registry))

    def __call__(self, value) -> str | None:
        if self.files and ":" in value:          # imports the user's file (on every rank), calls nothing
            userfile = importlib.import_module("mpifedmeta.userfile")
            try:
                return userfile.resolve(value, "") and None
            except userfile.UserFileError as e:
                return e.problem
        names, also = self.names(), " or FILE.py:FUNCTION" if self.files else ""
        return None if value in names else f"must be one of {', '.join(names)}{also}"


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _fraction(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _batch(v):
    if isinstance(v, str):
        return None if v == "full" else 'must be a positive integer or "full"'
    return None if v > 0 else 'must be a positive integer or "full"'


def _int_list(v):
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in v):
        return "must be a list of integers >= 0"
    return None if v else "must not be empty"


def _hidden(v):
    return None if all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in v) else "must be a list of positive integers"


def _compile_mode(v):
    return None if isinstance(v, bool) or v in COMPILE_MODES else f"must be true, false or one of {', '.join(COMPILE_MODES)}"


def _agent_chunk(v):
    if isinstance(v, str):
        return None if v == "auto" else 'must be "auto" or an integer >= 0'
    return None if v >= 0 else 'must be "auto" or an integer >= 0'


def _agents(v):
    if isinstance(v, str):
        return None if v == "all" else 'must be "all" or a positive integer'
    return None if v > 0 else 'must be "all" or a positive integer'


class _DatasetName(Registered):
    """data.dataset: a registered name, FILE.py:FUNCTION, or hf:NAME_OR_PATH (Hugging Face datasets, data/hf.py)."""

    def __call__(self, value) -> str | None:
        if value.startswith("hf:"):
            return None if value[3:].strip() else "hf: needs a Hub dataset name or a local directory (hf:NAME_OR_PATH)"
        return super().__call__(value)


# LEAF's Shakespeare vocabulary (LEAF models/utils/language_utils.py, ALL_LETTERS), the default of data.vocab
LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"

# How a run is executed, not what it computes: may change on resume, not part of the experiment.
_RUN_ONLY = {"resumable": True, "experiment": False}

SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "dataset": Key("digits", (str,), _DatasetName("mpifedmeta.data", "LOADERS", also=(("mpifedmeta.federation.population", "GENERATED"),), files=True),
                       "{choices} (synthetic: FedProx Synthetic(alpha, beta), generated per agent), your loader: FILE.py:FUNCTION | package.module:FUNCTION, or hf:NAME_OR_PATH (Hugging Face datasets: a Hub name, a save_to_disk directory, a directory of parquet/CSV files; pip install -e '.[hf]')"),
        "path": Key("", (str,), None, "file or directory of the data (npz file, fashion-mnist idx directory)"),
        "num_agents": Key(50, (int,), _non_negative, "agents in total, holdout agents included (0 = from the file, natural only)"),
        "holdout_agents": Key(0, (int,), _non_negative, "the last agents by id, never trained on: test adaptation of new agents"),
        "partition": Key("shards", (str,), Registered("mpifedmeta.data", "SCHEMES", also=(("mpifedmeta.federation.population", "VIRTUAL"),)),
                         "{choices} (virtual-*: agents drawn on demand, may share samples; not used by synthetic)"),
        "classes_per_agent": Key(2, (int,), _positive, "classes per agent for shards"),
        "dirichlet_alpha": Key(0.5, (float, int), _positive, "concentration of the Dirichlet label skew"),
        "test_fraction": Key(0.2, (float,), _fraction, "share of each agent's samples held out for evaluation (synthetic: always 10%)"),
        "samples_per_agent": Key(50, (int,), _positive, "virtual partitions: samples each agent draws from the dataset (train + test)"),
        "synthetic_alpha": Key(1.0, (float, int), _non_negative, "synthetic: alpha, spread of the agents' model means u_k ~ N(0, alpha^2)"),
        "synthetic_beta": Key(1.0, (float, int), _non_negative, "synthetic: beta, spread of the agents' feature means B_k ~ N(0, beta^2)"),
        "synthetic_iid": Key(False, (bool,), None, "synthetic: the iid variant (one shared W, b; v_k = B_k)"),
        "synthetic_max_samples": Key(1000, (int,), _positive, "synthetic: cap on an agent's samples min(int(lognormal(4, 2)) + 50, cap)"),
        "features": Key("image", (str,), lambda v: None if v else "must not be empty", "hf: the input column (Image feature or arrays: (C, H, W) floats in [0, 1]; text: character ids through data.vocab; numbers)"),
        "label": Key("label", (str,), lambda v: None if v else "must not be empty", "hf: the label column (integers, ClassLabel, or single characters: ids through data.vocab, len(vocab) + 1 classes)"),
        "agent_column": Key("", (str,), None, "hf: the column naming each sample's agent; partition = natural: one agent per distinct value, in sorted order"),
        "hf_split": Key("train", (str,), lambda v: None if v else "must not be empty", "hf: the split holding the agents' samples (a 'test' split besides it is the pooled test set, or natural: the agents' test samples)"),
        "hf_revision": Key("", (str,), None, "hf: the Hub revision (branch, tag or commit; empty = the default branch)"),
        "vocab": Key(LEAF_VOCAB, (str,), lambda v: None if v and len(set(v)) == len(v) else "must be a non-empty string of distinct characters", "hf: characters of text columns, id = position; any other character: id len(vocab) (default: LEAF's 80-character Shakespeare vocabulary)"),
        "test_split": Key("auto", (str,), _one_of(("auto", "random", "last")), "natural partitions: an agent's test samples: random | last (its last samples in row order: temporal data) | auto (last for hf text inputs, else random)"),
        "min_samples": Key(0, (int,), _non_negative, "natural partitions: agents with fewer samples are left out (0 = keep every agent; each needs >= 2)"),
    },
    "model": {
        "name": Key("mlp", (str,), Registered("mpifedmeta.models", "MODELS", files=True), "{choices}, or your builder: FILE.py:FUNCTION | package.module:FUNCTION"),
        "hidden": Key([80, 60], (list,), _hidden, "hidden widths (mlp), fully connected widths (cnn; FedAvg's: [512]), LSTM widths (char-lstm; LEAF's: [256, 256])"),
        "embedding": Key(8, (int,), _positive, "char-lstm: width of the character embedding"),
        "vocab": Key(0, (int,), _non_negative, "char-lstm, transformer: number of token ids (0 = the number of classes: next-token prediction)"),
        "width": Key(64, (int,), _positive, "transformer: model width (embedding, attention; the MLP is 4x)"),
        "depth": Key(2, (int,), _positive, "transformer: number of pre-norm blocks (attention + MLP)"),
        "heads": Key(4, (int,), _positive, "transformer: attention heads (must divide model.width)"),
        "causal": Key(True, (bool,), None, "transformer: causal attention, classify from the last position (next token); false: bidirectional, mean over positions"),
    },
    "train": {
        "rounds": Key(100, (int,), _non_negative, "communication rounds in total", resumable=True),
        "agents_per_round": Key(10, (int,), _positive, "agents sampled per round (the cohort)"),
        "local_steps": Key(10, (int,), _positive, "τ: local meta-steps per round"),
        "nu": Key(1, (int,), _non_negative, "ν: fine-tuning steps inside the meta-objective (0 = FedAvg)"),
        "alpha": Key(0.01, (float, int), _positive, "α: fine-tuning step size"),
        "beta": Key(0.001, (float, int), _positive, "β: meta step size"),
        "batch_size": Key(32, (int, str), _batch, 'samples per batch, or "full" (each agent\'s whole training split)'),
        "metagrad": Key("exact", (str,), Registered("mpifedmeta.core.metagrad", "METHODS"), "{choices}"),
        "hf_delta": Key(1e-3, (float,), _positive, "δ of the Hessian-free finite difference"),
        "weighting": Key("uniform", (str,), _one_of(("uniform", "samples")), "uniform | samples: weights of the average"),
        "seed": Key(0, (int,), _non_negative, "seed of partition, initial model, cohorts and batches", experiment=False),
        "dtype": Key("float32", (str,), _one_of(("float32", "float64")), "float32 | float64"),
        "strategy": Key("stacked", (str,), Registered("mpifedmeta.engine.backends", "BACKENDS", ("auto",)), "{choices} (auto: time each at start-up, keep the fastest within memory_budget, the default unless another is >3% faster)", **_RUN_ONLY),
        "chunk": Key(64, (int,), _positive, "agents per vmap call for strategy = chunked", **_RUN_ONLY),
        "memory_budget": Key(0, (int, float), _non_negative, "MB of memory a strategy may add (auto skips those above it; 0 = no limit)", **_RUN_ONLY),
        "recompute": Key(False, (bool,), None, "exact/hf: recompute the fine-tuned iterates in the backward pass (O(d) instead of O(nu*d) memory, ~nu/2 x more inner gradients)", **_RUN_ONLY),
        "compile": Key(False, (bool, str), _compile_mode, 'compile the whole local round: false/"off", true/"compile" (torch.compile), "cudagraphs" (CUDA only); eager fallback with a notice', **_RUN_ONLY),
        "device": Key("auto", (str,), _one_of(("auto", "cpu", "cuda")), "auto = the rank's GPU if any, else CPU", **_RUN_ONLY),
        "agent_chunk": Key("auto", (int, str), _agent_chunk, 'agents per batched call, the last chunk padded with dummy agents, so that kernel shapes do not depend on the number of ranks (0 = off: one call per block; "auto" = 32 on CUDA, 0 on CPU)', **_RUN_ONLY),
        "allow_tf32": Key(False, (bool,), None, "let CUDA float32 matmuls and cuDNN convolutions use TF32 (~1e-3 relative error; not allowed with metagrad = hf in float32)"),
        "threads": Key(0, (int,), _non_negative, "torch threads per rank (0 = $OMP_NUM_THREADS if set, else $SLURM_CPUS_PER_TASK if set, else 1: more cores = more ranks)", **_RUN_ONLY),
    },
    "algorithm": {
        # the algorithm's own keys live in this table too: validated by mpifedmeta.algorithms.check_section
        "name": Key("meta", (str,), None, 'meta (the nu-step family: train.nu, alpha, metagrad, hf_delta) | pfedme | ditto | fedrep, or your own: FILE.py:NAME | package.module:NAME; the algorithm\'s keys follow in [algorithm] (see below)'),
    },
    "server": {
        "optimizer": Key("sgd", (str,), _one_of(("sgd", "momentum", "adagrad", "adam", "yogi")), "server optimizer on the mean update (Reddi et al. 2021, no bias correction): sgd | momentum | adagrad | adam | yogi"),
        "lr": Key(1.0, (float, int), _positive, "server learning rate (sgd with lr = 1: plain averaging; pFedMe's beta_s)"),
        "momentum": Key(0.9, (float, int), _non_negative, "momentum: m <- momentum * m + delta"),
        "beta1": Key(0.9, (float, int), lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "adam, yogi: first-moment decay"),
        "beta2": Key(0.99, (float, int), lambda v: None if 0 <= v < 1 else "must be in [0, 1)", "adam, yogi: second-moment decay"),
        "eps": Key(1e-3, (float, int), _positive, "adagrad, adam, yogi: adaptivity eps"),
    },
    "privacy": {
        "clip": Key(None, (float, int), _positive, "DP-FedAvg: L2 bound C > 0 on each agent's update (turns differential privacy on; unset = off)"),
        "noise_multiplier": Key(None, (float, int), _non_negative, "z >= 0: Gaussian noise N(0, z^2 C^2) on the sum of the clipped updates (or set target_epsilon)"),
        "target_epsilon": Key(None, (float, int), _positive, "calibrate z at start-up so that epsilon after train.rounds rounds is at most this (within 5%)"),
        "delta": Key(None, (float,), _fraction, "delta of the (epsilon, delta) guarantee (unset: 1 / N^1.1, N the training agents)"),
        "sampling": Key("fixed", (str,), _one_of(("fixed", "poisson")), "fixed: agents_per_round agents a round (replace-one accounting); poisson: each training agent joins with probability agents_per_round / N (add/remove-one)"),
        "accountant": Key("rdp", (str,), _one_of(("rdp", "pld")), "dp-accounting's RDP or PLD accountant (PLD: poisson sampling only)"),
    },
    "eval": {
        "every": Key(10, (int,), _positive, "evaluate every this many rounds (and at round 0 and the end)"),
        "finetune_steps": Key([0, 1, 2, 3], (list,), _int_list, "the k fine-tuning steps evaluated"),
        "agents": Key("all", (int, str), _agents, 'training agents evaluated: "all" or a fixed random subset of this size'),
        "holdout_agents": Key("all", (int, str), _agents, 'holdout agents evaluated: "all" or a fixed random subset of this size'),
        "chunk": Key(256, (int,), _positive, "agents per batched evaluation call", **_RUN_ONLY),
        "stationarity": Key(False, (bool,), None, "also compute F(w) and ||grad F(w)||^2 on full local data, exact meta-gradient (costly)"),
    },
    "output": {
        "dir": Key("runs/default", (str,), None, "output directory", **_RUN_ONLY),
        "checkpoint_every": Key(10, (int,), _positive, "checkpoint every this many rounds (and round 0 and the end)", **_RUN_ONLY),
        "keep": Key(3, (int,), _positive, "checkpoints kept besides round 0", **_RUN_ONLY),
        "progress_every": Key(0, (int,), _non_negative, "print a progress line every this many rounds in batch jobs (0 = about 20 lines a run)", **_RUN_ONLY),
        "tensorboard": Key(False, (bool,), lambda v: importlib.import_module("mpifedmeta.storage.tensorboard").missing() if v else None, "also write TensorBoard event files under OUT/tensorboard/ (rank 0, as metrics.h5 is written; needs the [tb] extra: pip install -e '.[tb]')", **_RUN_ONLY),
    },
}


@dataclass(frozen=True)
class Section:
    values: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Config:
    """The resolved, validated configuration (access as ``cfg.train.nu``)."""

    raw: dict

    def __getattr__(self, name):
        if name in SCHEMA:
            return Section(self.raw[name])
        raise AttributeError(name)

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True)

    def with_values(self, **sections) -> "Config":
        raw = copy.deepcopy(self.raw)
        for sec, kv in sections.items():
            raw[sec].update(kv)
        return validate(raw)


INT_LIMIT = 2 ** 63        # every integer must fit in int64 (numpy, torch and MPI take them as C longs)


def _size_problem(value) -> str | None:
    """Why a value cannot be used whatever the key: an integer beyond int64, a non-finite float."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, int) and not isinstance(v, bool) and not -INT_LIMIT <= v < INT_LIMIT:
            return "too large (integers must fit in 64 bits)"
        if isinstance(v, float) and not math.isfinite(v):
            return "must be finite"
    return None


def _type_ok(value, key: Key) -> bool:
    if isinstance(value, bool):
        return bool in key.types
    return isinstance(value, key.types)


def validate(raw: dict) -> Config:
    """Fill defaults, check types, ranges and cross-key rules; raise ConfigError on the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a table of sections")
    for sec in raw:
        if sec not in SCHEMA:
            raise ConfigError(f"unknown section [{sec}] (valid: {', '.join(SCHEMA)})")
    given_algorithm = raw.get("algorithm", {})
    if not isinstance(given_algorithm, dict):
        raise ConfigError("[algorithm] must be a table")
    out = {sec: _section(sec, keys, raw.get(sec, {}) if sec != "algorithm" else
                         {k: v for k, v in given_algorithm.items() if k == "name"})
           for sec, keys in SCHEMA.items()}
    _check_data(out)
    _check_train(out["train"])
    _check_model(out["model"])
    algorithms = importlib.import_module("mpifedmeta.algorithms")
    out["algorithm"] = algorithms.check_section(given_algorithm, out["train"])
    _check_algorithm(out)
    _check_privacy(out)
    return Config(out)


def _check_privacy(out: dict) -> None:
    """Cross-key rules of differential privacy."""
    p, t = out["privacy"], out["train"]
    if p["clip"] is None:
        for k in ("noise_multiplier", "target_epsilon", "delta"):
            if p[k] is not None:
                raise ConfigError(f"privacy.{k} = {p[k]!r} needs privacy.clip (C > 0 turns differential privacy on)")
        return
    if (p["noise_multiplier"] is None) == (p["target_epsilon"] is None):
        raise ConfigError("privacy.clip is set: give exactly one of privacy.noise_multiplier or privacy.target_epsilon")
    if p["target_epsilon"] is not None and t["rounds"] == 0:
        raise ConfigError(f"privacy.target_epsilon = {p['target_epsilon']!r} needs train.rounds > 0 (z is calibrated "
                          "for the configured rounds)")
    if t["weighting"] != "uniform":
        raise ConfigError(f"train.weighting = {t['weighting']!r}: differential privacy (privacy.clip) needs uniform "
                          "weights (the noise is calibrated to a sum of clipped updates)")
    importlib.import_module("mpifedmeta.privacy.accountant").check(p["sampling"], p["accountant"])


def _check_algorithm(out: dict) -> None:
    """Cross-key rules of the algorithm: per-agent state needs agents that stay on one rank."""
    algorithms = importlib.import_module("mpifedmeta.algorithms")
    population = importlib.import_module("mpifedmeta.federation.population")
    d, name = out["data"], out["algorithm"]["name"]
    algo = algorithms.make(out["algorithm"], out["train"])
    generated = d["dataset"] in population.GENERATED or d["partition"] in population.VIRTUAL
    if generated and algo.stateful:
        raise ConfigError(f"algorithm.name = {name!r} keeps state per agent, which a generated population "
                          f"(data.dataset = {d['dataset']!r}, data.partition = {d['partition']!r}) does not store: "
                          "use a stored partition (shards, dirichlet, iid, natural) or a stateless algorithm")


def _section(sec: str, keys: dict[str, Key], given) -> dict:
    """One section's values: defaults filled, each key's type, size and range checked."""
    if not isinstance(given, dict):
        raise ConfigError(f"[{sec}] must be a table")
    for k in given:
        if k not in keys:
            raise ConfigError(f"unknown key {sec}.{k} (valid: {', '.join(keys)})")
    values = {}
    for k, key in keys.items():
        v = given.get(k, copy.deepcopy(key.default))
        if v is None and key.default is None:     # an optional key left unset (stored as null)
            values[k] = None
            continue
        if not _type_ok(v, key):
            names = " or ".join(t.__name__ for t in key.types)
            raise ConfigError(f"{sec}.{k} = {v!r}: must be of type {names}")
        if (msg := _size_problem(v)):
            raise ConfigError(f"{sec}.{k} = {_short(v)}: {msg}")
        if isinstance(v, int) and not isinstance(v, bool) and float in key.types:
            v = float(v)
        if key.check is not None and (msg := key.check(v)):
            raise ConfigError(f"{sec}.{k} = {v!r}: {msg}")
        values[k] = v
    return values


def _check_data(out: dict) -> None:
    """Cross-key rules of the data (files, agent counts, generated populations)."""
    d, t = out["data"], out["train"]
    if d["partition"] == "natural" and d["dataset"] != "npz" and ":" not in d["dataset"]:
        raise ConfigError("data.partition = 'natural' needs data.dataset = 'npz' (or your loader) with an 'agent' array")
    if d["dataset"].startswith("hf:"):
        if d["partition"] == "natural" and not d["agent_column"]:
            raise ConfigError(f"data.partition = 'natural' with data.dataset = {d['dataset']!r} needs data.agent_column "
                              "(the column naming each sample's agent)")
        if len({d["features"], d["label"], d["agent_column"]} - {""}) < 2 + bool(d["agent_column"]):
            raise ConfigError(f"data.features = {d['features']!r}, data.label = {d['label']!r} and data.agent_column = "
                              f"{d['agent_column']!r} must name different columns")
        if importlib.import_module("importlib.util").find_spec("datasets") is None:
            raise ConfigError(f"data.dataset = {d['dataset']!r} needs the Hugging Face datasets package: "
                              "install the [hf] extra, pip install -e '.[hf]'")
    for key, default in (("test_split", "random"), ("min_samples", 0)):
        if d["partition"] != "natural" and d[key] not in (default, "auto"):
            raise ConfigError(f"data.{key} = {d[key]!r} applies to data.partition = 'natural' only (got {d['partition']!r})")
    if d["dataset"] == "npz" and not d["path"]:
        raise ConfigError("data.dataset = 'npz' needs data.path (the .npz file)")
    if d["dataset"] == "npz" and not os.path.exists(d["path"]):
        raise ConfigError(f"data.path = {d['path']!r}: file not found")
    if d["dataset"] == "npz" and not os.path.isfile(d["path"]):
        raise ConfigError(f"data.path = {d['path']!r}: not a regular file")
    if d["dataset"] == "fashion-mnist" and d["path"] and not os.path.isdir(d["path"]):
        raise ConfigError(f"data.path = {d['path']!r}: directory not found")
    population = importlib.import_module("mpifedmeta.federation.population")
    generated = d["dataset"] in population.GENERATED or d["partition"] in population.VIRTUAL
    if d["num_agents"] > MAX_AGENTS:
        raise ConfigError(f"data.num_agents = {d['num_agents']} exceeds {MAX_AGENTS} (agent ids are 32-bit counters)")
    if d["dataset"] == "synthetic":
        if d["synthetic_max_samples"] < 2:
            raise ConfigError(f"data.synthetic_max_samples = {d['synthetic_max_samples']}: an agent needs >= 2 samples (1 train, 1 test)")
        if out["model"]["name"] == "cnn":
            raise ConfigError("model.name = 'cnn' needs images; data.dataset = 'synthetic' has 60 features (use linear or mlp)")
    elif d["partition"] in population.VIRTUAL and d["samples_per_agent"] < 2:
        raise ConfigError(f"data.samples_per_agent = {d['samples_per_agent']}: a virtual agent needs >= 2 samples (1 train, 1 test)")
    if d["num_agents"] == 0 and d["partition"] != "natural":
        raise ConfigError("data.num_agents = 0 (from the file) is only valid with data.partition = 'natural'")
    if d["num_agents"] and d["holdout_agents"] >= d["num_agents"]:
        raise ConfigError(f"data.holdout_agents = {d['holdout_agents']} must be < data.num_agents = {d['num_agents']}")
    if d["num_agents"] and t["agents_per_round"] > d["num_agents"] - d["holdout_agents"]:
        raise ConfigError(f"train.agents_per_round = {t['agents_per_round']} exceeds the "
                          f"{d['num_agents'] - d['holdout_agents']} training agents (data.num_agents - data.holdout_agents)")
    if generated:
        e = out["eval"]
        for key, n in (("agents", d["num_agents"] - d["holdout_agents"]), ("holdout_agents", d["holdout_agents"])):
            if e[key] == "all" and n > MAX_EVALUATED:
                raise ConfigError(f"eval.{key} = 'all' would evaluate {n} generated agents at every evaluation "
                                  f"(more than {MAX_EVALUATED}); set eval.{key} to a sample size, e.g. 1000")


def _check_model(m: dict) -> None:
    """Cross-key rules of the model's sizes."""
    if m["name"] == "transformer" and m["width"] % m["heads"]:
        raise ConfigError(f"model.heads = {m['heads']} must divide model.width = {m['width']}")


def _check_train(t: dict) -> None:
    """Cross-key rules of the numerics."""
    if t["metagrad"] == "hf" and t["dtype"] == "float32" and t["hf_delta"] < 1e-5:
        raise ConfigError(f"train.hf_delta = {t['hf_delta']} is below float32 resolution for finite differences; use >= 1e-5 or train.dtype = 'float64'")
    if t["allow_tf32"] and t["metagrad"] == "hf" and t["dtype"] == "float32":
        raise ConfigError("train.allow_tf32 = true with train.metagrad = 'hf' in float32: TF32 rounding (~1e-3 relative) "
                          "divided by 2*hf_delta swamps the Hessian-free HVP; use exact, fo or train.dtype = 'float64'")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def parse_value(text: str):
    """A --set value: TOML syntax when it parses (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return doc["v"] if list(doc) == ["v"] else text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must be section.key (e.g. train.nu=3)")
        sec, k = parts
        if any(c in value for c in "\n\r\x00"):     # refused, never cut: one value per --set
            raise ConfigError(f"--set {path.strip()}=...: the value contains a line break or NUL; give one value per --set")
        if sec not in SCHEMA:
            raise ConfigError(f"--set {item!r}: unknown section [{sec}] (valid: {', '.join(SCHEMA)})")
        if k not in SCHEMA[sec] and sec != "algorithm":     # [algorithm]: the algorithm's keys, checked later
            raise ConfigError(f"--set {item!r}: unknown key {sec}.{k} (valid: {', '.join(SCHEMA[sec])})")
        raw.setdefault(sec, {})[k] = parse_value(value.strip())
    return raw


def load(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or none: defaults), apply overrides, validate."""
    raw: dict = {}
    if path:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):     # a FIFO would block, a device never end
                raise ConfigError(f"{path}: not a regular file")
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES + 1)
            if len(text) > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KB; not a config file")
            raw = tomllib.loads(text.decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {text[e.start]:#04x} at offset {e.start}); "
                              "a config is a TOML text file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return validate(apply_overrides(raw, overrides or []))


def from_json(text: str) -> Config:
    return validate(json.loads(text))


def keys_where(flag: str, value: bool = True) -> dict[str, tuple[str, ...]]:
    """Section → the keys whose ``flag`` ("resumable" or "experiment") equals ``value``."""
    return {sec: tuple(k for k, key in keys.items() if getattr(key, flag) == value) for sec, keys in SCHEMA.items()}


def key_doc(key: Key) -> str:
    """The key's meaning, with the registered names filled in."""
    if isinstance(key.check, Registered):
        return key.doc.format(choices=" | ".join(key.check.names()))
    return key.doc


def describe() -> str:
    """All keys with defaults and meaning, for `mpifedmeta config` and the README."""
    lines = []
    for sec, keys in SCHEMA.items():
        lines.append(f"[{sec}]")
        for k, key in keys.items():
            if key.default is None:        # unset by default: TOML has no null, so shown commented out
                lines.append(f"# {k} =    # (unset) {key_doc(key)}")
            else:
                lines.append(f"{k} = {json.dumps(key.default)}    # {key_doc(key)}")
        if sec == "algorithm":
            lines.append(importlib.import_module("mpifedmeta.algorithms").describe())
        lines.append("")
    return "\n".join(lines)
