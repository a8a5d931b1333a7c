"""How a run begins: a new run (set-up, metrics.h5, the round-0 evaluation and checkpoint), a resume
from the newest checkpoint (everything checked before anything is changed) and ``run
--auto-resume``. Each holds the output lock for the run's life and then enters the round loop.
"""

from __future__ import annotations

import json
import os
import time

import torch

from mpifedmeta import __version__
from mpifedmeta.parallel import dist
from mpifedmeta.run.config import Config, ConfigError, from_json, keys_where
from mpifedmeta.run.console import say
from mpifedmeta.run.protocol import agreed, check_output_dir, output_lock
from mpifedmeta.run.runner import EXIT_OK, checkpoint_attrs, checkpoint_groups, model_arrays, privacy_attrs, train
from mpifedmeta.run.session import Setup, setup
from mpifedmeta.storage import checkpoint, files, hdf5, metrics
from mpifedmeta.storage.resume import resume_point

# Keys that may change between a run and its resumption (flagged in config.SCHEMA).
RESUMABLE_KEYS = keys_where("resumable")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def start_new(cfg: Config, world: dist.World) -> int:
    """Start the run of ``cfg`` in its output.dir (which must not hold a run yet)."""
    agreed(world, lambda: check_output_dir(cfg.output.dir), root_only=True)
    with output_lock(world, cfg.output.dir):
        return _start_new(cfg, world)


def _start_new(cfg: Config, world: dist.World) -> int:
    out_dir = cfg.output.dir

    def fresh():
        if os.path.lexists(metrics.path_of(out_dir)):
            raise ConfigError(f"output.dir = {out_dir!r} already holds a run (metrics.h5); continue it with "
                              f"`mpifedmeta resume {out_dir}` or choose another output.dir")
    agreed(world, fresh, root_only=True)
    s = setup(cfg, world)
    params = s.w0

    def create():
        files.clean_stale_temps(out_dir)
        arrays, attrs = s.population.metadata(s.num_train)
        metrics.create(out_dir, cfg.to_json(), _file_attrs(s, params), arrays, {**attrs, "dataset": cfg.data.dataset},
                       list(cfg.eval.finetune_steps), s.round.evals.train_ids, s.round.evals.holdout_ids,
                       s.round.spec.algorithm.personalized, privacy_attrs(s))
    agreed(world, create, root_only=True, errors=())
    row = s.round.evaluate(params, 0)
    groups = checkpoint_groups(s, s.round.server_state, s.round.agent_state())

    def first_checkpoint():
        metrics.append(out_dir, [], [row])
        checkpoint.write(out_dir, 0, model_arrays(s, params), cfg.to_json(), checkpoint_attrs(s, 0.0), cfg.output.keep,
                         groups)
    agreed(world, first_checkpoint, root_only=True, errors=())
    say(world, f"mpifedmeta {__version__}: {s.population.num_agents} agents ({s.population.num_agents - s.num_train} holdout) on "
               f"{world.size} rank(s), {cfg.model.name} with {params.numel()} parameters, "
               f"{_algorithm_text(cfg, s)}, device {s.device}, agent chunk {s.agent_chunk_line}, "
               f"strategy {s.strategy_line}")
    return train(s, out_dir, params, 0, 0.0, first_eval=row)


def _algorithm_text(cfg: Config, s: Setup) -> str:
    """The algorithm as the start-up line names it (meta: ν and the flavour; others: their keys)."""
    a, t = cfg.algorithm.values, cfg.train
    text = f"nu={t.nu} {t.metagrad}" if a["name"] == "meta" else \
        a["name"] + "(" + ", ".join(f"{k}={v}" for k, v in a.items() if k != "name" and v is not None) + ")"
    server_ = cfg.server
    text += "" if server_.optimizer == "sgd" and server_.lr == 1.0 else f", server {server_.optimizer} lr={server_.lr}"
    p = s.round.spec.privacy
    if p is not None:
        how = f"calibrated to epsilon {cfg.privacy.target_epsilon:g} in {cfg.train.rounds} rounds" \
            if cfg.privacy.target_epsilon is not None else "given"
        text += (f", DP: clip {p.clip:g}, noise multiplier {p.noise_multiplier:.4g} ({how}), delta {p.delta:.3g}, "
                 f"{p.sampling} sampling q={p.q:.4g}, {p.accountant}")
    return text


def _file_attrs(s: Setup, params: dict) -> dict:
    return {"mpifedmeta_version": __version__, "torch_version": str(torch.__version__),
            "strategy": s.strategy, "strategy_setting": s.cfg.train.strategy, "num_params": int(params.numel()),
            "algorithm": s.round.spec.algorithm.name,
            "world_size_at_start": s.world.size, **_device_attrs(s)}


def _device_attrs(s: Setup) -> dict:
    """What the results' bits depend on besides the config: device, fixed agent chunk, numerics."""
    cuda = s.device.type == "cuda"
    names = sorted({f"{r['name']}" + (f" ({r['sms']} SMs)" if r.get("sms") else "") for r in s.device_map})
    return {"device": s.device.type, "device_names": "; ".join(names), "agent_chunk": int(s.round.spec.agent_chunk),
            "tf32": bool(cuda and s.cfg.train.allow_tf32), "cuda_deterministic": cuda,
            "cuda_version": str(torch.version.cuda or "")}


def resume(out_dir: str, world: dist.World, rounds: int | None = None) -> int:
    """Continue the run in ``out_dir`` from its latest checkpoint (to ``rounds`` in total if given)."""
    def exists():
        if not os.path.isdir(out_dir):
            raise hdf5.OutputError(f"{out_dir}: no such directory (nothing to resume)")
    agreed(world, exists, root_only=True)
    with output_lock(world, out_dir):
        return _resume(out_dir, world, rounds)


def _resume(out_dir: str, world: dist.World, rounds: int | None) -> int:
    # Everything is checked before anything is changed: a refused resume leaves every file as it was.
    point = dist.broadcast(world, agreed(world, lambda: resume_point(out_dir, rounds, RESUMABLE_KEYS), root_only=True))
    cfg, round_, path, wall = from_json(point.config_json), point.round, point.path, point.wall_time
    if round_ >= cfg.train.rounds:
        say(world, f"{out_dir}: already complete ({round_} of {cfg.train.rounds} rounds); "
                   "nothing to do (use --rounds N to train further)")
        return EXIT_OK
    s = setup(cfg, world, point.recorded)
    like = s.w0
    expect = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in s.layout.split(like).items()}

    server_shapes, agent_shapes = _state_shapes(s)

    def load_then_cut():
        _, values, _, _ = checkpoint.read(path, expect)     # shapes and dtypes checked before any data is read
        server_ = checkpoint.read_group(path, "server", server_shapes) if server_shapes else {}
        if agent_shapes is not None:
            checkpoint.read_group(path, "agent_state", agent_shapes, rows=(0, 0))     # declared shapes only
        files.clean_stale_temps(out_dir)
        dropped = metrics.truncate(out_dir, round_)
        if dropped:
            print(f"mpifedmeta: dropped {dropped} metrics rows written after the checkpoint of round {round_}", flush=True)
        return values, server_
    values, server_ = dist.broadcast(world, agreed(world, load_then_cut, root_only=True))
    params = s.layout.flatten({k: torch.as_tensor(values[k]) for k in s.layout.names}).to(device=s.device, dtype=s.dtype)
    if server_:
        s.round.server_state = server_
    _load_agent_state(s, path, world)
    say(world, f"mpifedmeta: {_now()} resuming {out_dir} at round {round_} of {cfg.train.rounds} on {world.size} rank(s)")
    return train(s, out_dir, params, round_, wall)


def _state_shapes(s: Setup) -> tuple[dict, dict | None]:
    """The checkpoint groups' expected {dataset: (shape, dtype)}: the server optimizer's, the agents'."""
    d = s.layout.numel
    server_ = {k: ((d,), "float64") for k in s.round.server_state}
    st = s.round.state
    if st is None:
        return server_, None
    size = st.values.shape[1]
    dtype = str(st.values.dtype).replace("torch.", "")
    return server_, {"values": ((s.population.num_agents, size), dtype), "has": ((s.population.num_agents,), "uint8")}


def _load_agent_state(s: Setup, path: str, world: dist.World) -> None:
    """Each rank reads its own rows of the agents' state (a resume may use another number of ranks)."""
    _, agents = _state_shapes(s)
    if agents is not None:
        st = s.round.state
        got = agreed(world, lambda: checkpoint.read_group(path, "agent_state", agents, rows=(st.lo, st.hi)))
        st.load(got["values"], got["has"])


def auto_resume_or_start(cfg: Config, world: dist.World) -> int:
    """`run --auto-resume`: resume OUT if it holds a run of the same config, else start it."""
    out_dir = cfg.output.dir
    agreed(world, lambda: check_output_dir(out_dir), root_only=True)
    with output_lock(world, out_dir):
        def holds_run():
            if not os.path.lexists(metrics.path_of(out_dir)):
                return False
            # both through validation, so that keys added since the run was made compare at their defaults
            stored = from_json(json.dumps(metrics.read(out_dir).config)).to_json()
            diffs = hdf5.config_json_equal(stored, cfg.to_json(), RESUMABLE_KEYS)
            if diffs:
                raise ConfigError(f"output.dir = {out_dir!r} holds a run with a different config "
                                  f"({', '.join(diffs[:5])}); choose another output.dir")
            return True
        if not dist.broadcast(world, agreed(world, holds_run, root_only=True)):
            return _start_new(cfg, world)
        return _resume(out_dir, world, cfg.train.rounds)
