"""Refuse absurd sizes before set-up: the memory a round and an evaluation need at least, per rank,
against the memory the rank's device offers. Lower bounds only (no false refusals); the message
names the key whose value is furthest above its default.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

from mpifedmeta.run.config import SCHEMA, Config, ConfigError

GB = 1 << 30


def available_bytes(device: torch.device, ranks_on_node: int = 1) -> int | None:
    """Free memory this rank may use: the GPU's free memory, else the node's available memory
    (/proc/meminfo MemAvailable, or the cgroup limit if lower) shared by the node's ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit.isdigit():
            avail = min(avail, int(limit) - used) if avail is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return None if avail is None else max(0, avail) // max(1, ranks_on_node)


def _blame(cfg: Config, keys: list[str]) -> str:
    """The key among ``keys`` whose value is the most times its default (e.g. train.nu = 10**8)."""
    def ratio(key: str) -> float:
        sec, k = key.split(".")
        v, default = cfg.raw[sec][k], SCHEMA[sec][k].default
        if isinstance(v, list):
            v, default = max(v or [0]), max(default or [1])
        if isinstance(v, str) or isinstance(default, str) or v is None or default is None:
            return 0.0
        return float(v) / max(float(default), 1.0)
    return max(keys, key=ratio)


def round_needs(cfg: Config, ranks: int, num_params: int, sample_numel: int, samples: int, itemsize: int,
                algo=None, state_numel: int = 0) -> list:
    """[(bytes, keys to blame, what)] lower bounds on one rank's memory for a round and an evaluation.
    ``algo``: the run's algorithm (its batch slots and the models a local update holds);
    ``state_numel``: the values it keeps per agent (stateful algorithms)."""
    if algo is None:
        algo = importlib.import_module("mpifedmeta.algorithms").make(cfg.algorithm.values, cfg.train.values)
    t, e = cfg.train, cfg.eval
    agents = cfg.data.num_agents or t.agents_per_round
    per_rank = max(1, min(t.agents_per_round, -(-agents // ranks)))
    at_once = {"stacked": per_rank, "vmap": per_rank, "chunked": min(per_rank, t.chunk)}.get(t.strategy, 1)   # auto: at least 1
    batch = t.batch_size if t.batch_size != "full" else max(1, samples // max(1, agents))
    slots, steps, iterates = algo.slots, algo.steps, algo.models_at_once
    kmax = max(e.finetune_steps)
    eval_at_once = min(e.chunk, max(1, -(-agents // ranks)))
    needs = []
    if t.batch_size != "full":
        needs.append((per_rank * steps * slots * batch * 8,
                      ["train.nu", "train.local_steps", "train.batch_size", "train.agents_per_round"],
                      "the round's batch indices (agents x local_steps x batches per meta-gradient x batch_size x 8 bytes)"))
    needs.append((at_once * num_params * itemsize * iterates,
                  ["model.hidden", "train.nu", "train.agents_per_round", "train.chunk"],
                  f"the local update's models (agents at once x {num_params} parameters x {iterates})"))
    needs.append((at_once * batch * sample_numel * itemsize,
                  ["train.batch_size", "train.agents_per_round", "train.chunk"],
                  "one batch of inputs per agent"))
    needs.append((eval_at_once * (kmax + 1) * num_params * itemsize,
                  ["eval.finetune_steps", "eval.chunk", "model.hidden"],
                  f"the evaluation's fine-tuned models (agents x (max k + 1) x {num_params} parameters)"))
    needs.append((num_params * 16, ["model.hidden"], f"the model's {num_params} parameters as exact sums (16 bytes each)"))
    if state_numel:
        block = -(-agents // ranks)
        needs.append((block * state_numel * itemsize, ["algorithm.name", "data.num_agents", "model.hidden"],
                      f"the per-agent state of algorithm {algo.name!r} ({block} agents x {state_numel} values)"))
        needs.append((agents * (state_numel * itemsize + 1), ["algorithm.name", "data.num_agents", "model.hidden"],
                      f"every agent's state of algorithm {algo.name!r} gathered for a checkpoint on rank 0 "
                      f"({agents} agents x {state_numel} values)"))
    return needs


def check_run(cfg: Config, ranks: int, input_shape: tuple, num_params: int, itemsize: int, device: torch.device,
              ranks_on_node: int = 1, samples: int = 0, algo=None, state_numel: int = 0) -> None:
    """ConfigError (one line naming a key) when a lower bound of the memory a rank needs exceeds what it has."""
    sample_numel = int(math.prod(input_shape))
    avail = available_bytes(device, ranks_on_node)
    if avail is None:
        return
    for need, keys, what in round_needs(cfg, ranks, num_params, sample_numel, samples, itemsize, algo, state_numel):
        if need > avail:
            key = _blame(cfg, keys)
            sec, k = key.split(".")
            raise ConfigError(f"{key} = {cfg.raw[sec][k]!r}: {what} need at least {need / GB:.3g} GB per rank, more "
                              f"than the {avail / GB:.3g} GB available on {device}")
