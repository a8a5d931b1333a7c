"""The training loop: rounds, checkpoints, signals, start and resume (the set-up is in session.py).

Data flows config → dataset → partition → this rank's block → rounds (cohort, batched local
update, one Allreduce) → rank 0 writes HDF5. Every rank runs the same code; only rank 0 writes
and prints.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from mpifedmeta import __version__
from mpifedmeta.core import exactsum, metagrad, rng
from mpifedmeta.federation import algorithm
from mpifedmeta.parallel import dist
from mpifedmeta.run import signals
from mpifedmeta.storage import io
from mpifedmeta.run.config import Config, ConfigError, from_json, keys_where
from mpifedmeta.run.console import Progress, final_table, say
from mpifedmeta.run.session import (INPUT_ERRORS, BadInput, Setup, agreed, check_output_dir, choose_strategy,  # noqa: F401 (re-exported)
                      cohort_block, evaluate, initial_params, output_lock, setup)

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_DIVERGED, EXIT_DISK_FULL = 0, 1, 2, 3, 4, 5
# Keys that may change between a run and its resumption (flagged in config.SCHEMA).
RESUMABLE_KEYS = keys_where("resumable")


def _params_numpy(s: "Setup", w: torch.Tensor) -> dict[str, np.ndarray]:
    """The flat global model as {parameter name: array} (the checkpoint's datasets)."""
    return {k: v.numpy() for k, v in s.layout.split(w.detach().cpu()).items()}


class _Writer:
    """Rank 0's files during training: metrics rows not yet written and checkpoints, and the stop
    checkpoint that a signal asks for.

    On a stop signal the handler calls :meth:`on_stop`: if the last completed round's checkpoint is
    not on disk yet, it is written at once (a launcher may SIGKILL a second later, long before the
    current round ends); the loop still finishes its round and checkpoints that one too. Every write
    of the loop goes through :func:`agreed`, so a full disk ends every rank with exit 5.
    """

    def __init__(self, s: "Setup", out_dir: str, round_: int, params: dict, wall: float):
        self.s, self.out_dir = s, out_dir
        self.train: list[dict] = []
        self.eval: list[dict] = []
        self.done = (round_, params, wall)      # the last completed round
        self.on_disk = round_                   # the newest round whose checkpoint is written
        self.busy = False

    def completed(self, round_: int, params: dict, wall: float) -> None:
        self.done = (round_, params, wall)

    def _write(self, checkpoint: bool) -> None:
        """Rank 0: the pending rows (metrics first: a crash in between leaves rows the resume
        truncates), then the last completed round's checkpoint if asked and not yet on disk."""
        self.busy = True
        try:
            io.append_metrics(self.out_dir, self.train, self.eval)
            self.train, self.eval = [], []
            r, params, wall = self.done
            if checkpoint and self.on_disk != r:
                io.write_checkpoint(self.out_dir, r, _params_numpy(self.s, params), self.s.cfg.to_json(),
                                    _ckpt_attrs(self.s, wall), self.s.cfg.output.keep)
                self.on_disk = r
        finally:
            self.busy = False

    def flush(self, checkpoint: bool = False) -> None:
        """On every rank: rank 0 writes, every rank learns whether it worked."""
        agreed(self.s.world, (lambda: self._write(checkpoint)) if self.s.world.is_root else None,
               root_only=True, errors=())
        self.train, self.eval = [], []

    def on_stop(self) -> None:
        """Signal-handler hook (main thread, between two bytecodes); never raises."""
        if not self.s.world.is_root or self.busy or self.on_disk >= self.done[0]:
            return                  # a write in progress, or nothing new: the loop's own write follows
        try:
            self._write(True)
            text = f"mpifedmeta: {_now()} stop signal: checkpoint of the last completed round {self.on_disk} written\n"
        except Exception as e:      # e.g. disk full: the loop's own write reports it
            text = f"mpifedmeta: stop signal: could not write a checkpoint at once: {str(e).splitlines()[0]}\n"
        os.write(2, text.encode())  # not print(): the handler may have interrupted a print


def _due(round_: int, every: int, last: int) -> bool:
    return round_ % every == 0 or round_ == last


def _run_round(s: Setup, params: torch.Tensor, r: int) -> tuple[torch.Tensor | None, float, int, int, dict]:
    """Local round on every rank, then the server step; (new w, meta-loss, bad agents, stop, timings)."""
    cohort = rng.cohort(s.cfg.train.seed, r, s.num_train, s.cfg.train.agents_per_round)
    weights = algorithm.cohort_weights(cohort, s.train_counts, s.cfg.train.weighting)
    tc = time.perf_counter()
    sums = algorithm.local_round(s.backend, cohort_block(s, cohort), params, s.spec, r, cohort, weights)
    if params.is_cuda:
        torch.cuda.synchronize(params.device)
    t_compute = time.perf_counter() - tc
    _maybe_inject_failure(s.world, r)
    stop = 1 if signals.requested() else 0
    new_params, meta_loss, (bad, stop), timings = algorithm.aggregate(s.world, s.stage, sums, [stop], params,
                                                                             int(weights.sum()))
    # every rank's compute time, max and min: load imbalance told apart from communication
    timings["compute_time"], timings["compute_time_min"] = dist.max_min(s.world, t_compute)
    return new_params, meta_loss, bad, stop, timings


def _report_divergence(world: dist.World, r: int, bad: int) -> int:
    say(world, f"mpifedmeta: diverged in round {r}: non-finite or out-of-range (|value| >= {exactsum.LIMIT:g}) "
               f"parameters in the local models ({bad} agent chunk(s)); keeping the last good checkpoint. "
               "Lower train.beta / train.alpha.", err=True)
    return EXIT_DIVERGED


def _report_stop(world: dist.World, r: int, out_dir: str) -> int:
    say(world, f"mpifedmeta: {_now()} stop requested ({signals.requested() or 'signal on another rank'}); "
               f"checkpoint of round {r} written to {out_dir}; continue with `mpifedmeta resume {out_dir}` "
               f"(exit code {EXIT_STOPPED})", err=True)
    return EXIT_STOPPED


def _finish(s: Setup, out_dir: str, last_eval: dict | None, wall: float) -> None:
    """Rank 0: the final accuracy table and the closing line."""
    if not s.world.is_root:
        return
    if last_eval is None:
        last_eval = _last_eval_row(out_dir)
    if last_eval is not None:
        print(final_table(list(s.cfg.eval.finetune_steps), last_eval), flush=True)
    print(f"done: {s.cfg.train.rounds} rounds, {wall:.1f} s of training; results in {out_dir}", flush=True)


def train(s: Setup, out_dir: str, params: dict, start_round: int, wall0: float) -> int:
    """Rounds start_round+1 .. cfg.train.rounds; returns the exit code (0, 3 stopped, 4 diverged)."""
    cfg, R = s.cfg, s.cfg.train.rounds
    files = _Writer(s, out_dir, start_round, params, wall0)
    progress = Progress(s.world, start_round, R, cfg.output.progress_every)
    last_eval, wall, code = None, wall0, EXIT_OK
    signals.on_stop(files.on_stop)
    try:
        for r in range(start_round + 1, R + 1):
            t0 = time.perf_counter()
            new_params, meta_loss, bad, stop, timings = _run_round(s, params, r)
            if bad:
                code = _report_divergence(s.world, r, bad)
                break
            params = new_params
            round_time = time.perf_counter() - t0
            wall += round_time
            files.train.append({"round": r, "meta_loss": meta_loss, "wall_time": wall, "round_time": round_time,
                                "num_sampled": cfg.train.agents_per_round, **timings})
            evaluated = _due(r, cfg.eval.every, R)
            if evaluated:
                last_eval = evaluate(s, params, r)
                if s.world.is_root:
                    files.eval.append(last_eval)
            files.completed(r, params, wall)
            progress.update(r, R, meta_loss, round_time, last_eval if evaluated else None)
            checkpointed = _due(r, cfg.output.checkpoint_every, R) or bool(stop)
            if checkpointed or evaluated:
                files.flush(checkpoint=checkpointed)
            if signals.requested():
                files.on_stop()
            if stop and r < R:
                code = _report_stop(s.world, r, out_dir)
                break
    finally:
        signals.on_stop(None)
        progress.close()
    files.flush()
    if code == EXIT_OK:
        _finish(s, out_dir, last_eval, wall)
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _maybe_inject_failure(world: dist.World, round_: int) -> None:
    """Fault injection for tests: MPIFEDMETA_INJECT_FAILURE="RANK:ROUND" raises on that rank in that
    round; MPIFEDMETA_INJECT_SLEEP="ROUND:SECONDS" makes that round that much longer on every rank."""
    slow = os.environ.get("MPIFEDMETA_INJECT_SLEEP")
    if slow and int(slow.split(":")[0]) == round_:
        time.sleep(float(slow.split(":")[1]))
    spec = os.environ.get("MPIFEDMETA_INJECT_FAILURE")
    if spec:
        rank, at = (int(v) for v in spec.split(":"))
        if rank == world.rank and at == round_:
            raise RuntimeError(f"injected failure on rank {rank} in round {round_} (MPIFEDMETA_INJECT_FAILURE)")


def _last_eval_row(out_dir: str) -> dict | None:
    e = io.read_table(out_dir, "eval")
    if len(e["round"]) == 0:
        return None
    return {k: e[k][-1] for k in io.EVAL_AGENTS}


def start_new(cfg: Config, world: dist.World) -> int:
    """Start the run of ``cfg`` in its output.dir (which must not hold a run yet)."""
    agreed(world, lambda: check_output_dir(cfg.output.dir), root_only=True)
    with output_lock(world, cfg.output.dir):
        return _start_new(cfg, world)


def _start_new(cfg: Config, world: dist.World) -> int:
    out_dir = cfg.output.dir

    def fresh():
        if os.path.lexists(io.metrics_path(out_dir)):
            raise ConfigError(f"output.dir = {out_dir!r} already holds a run (metrics.h5); continue it with "
                              f"`mpifedmeta resume {out_dir}` or choose another output.dir")
    agreed(world, fresh, root_only=True)
    s = setup(cfg, world)
    params = initial_params(s)
    chosen = choose_strategy(s, params)

    def create():
        io.clean_stale_temps(out_dir)
        arrays, attrs = s.population.metadata(s.num_train)
        io.create_metrics(out_dir, cfg.to_json(), _file_attrs(s, params), arrays, {**attrs, "dataset": cfg.data.dataset},
                          list(cfg.eval.finetune_steps), s.eval_train_ids, s.holdout_ids)
    agreed(world, create, root_only=True, errors=())
    row = evaluate(s, params, 0)

    def first_checkpoint():
        io.append_metrics(out_dir, [], [row])
        io.write_checkpoint(out_dir, 0, _params_numpy(s, params), cfg.to_json(), _ckpt_attrs(s, 0.0), cfg.output.keep)
    agreed(world, first_checkpoint, root_only=True, errors=())
    say(world, f"mpifedmeta {__version__}: {s.population.num_agents} agents ({s.population.num_agents - s.num_train} holdout) on "
               f"{world.size} rank(s), {cfg.model.name} with {params.numel()} parameters, "
               f"nu={cfg.train.nu} {cfg.train.metagrad}, device {s.device}, strategy {chosen}")
    return train(s, out_dir, params, 0, 0.0)


def _ckpt_attrs(s: Setup, wall: float) -> dict:
    return {"wall_time": wall, "strategy": s.strategy, "rng": "counter-based: (seed, round, agent, step)",
            "agent_chunk": s.spec.agent_chunk}


def _file_attrs(s: Setup, params: dict) -> dict:
    return {"mpifedmeta_version": __version__, "torch_version": str(torch.__version__),
            "strategy": s.strategy, "strategy_setting": s.cfg.train.strategy, "num_params": int(params.numel()),
            "world_size_at_start": s.world.size, **_device_attrs(s)}


def _device_attrs(s: Setup) -> dict:
    """What the results' bits depend on besides the config: device, fixed agent chunk, numerics."""
    cuda = s.device.type == "cuda"
    names = sorted({f"{r['name']}" + (f" ({r['sms']} SMs)" if r.get("sms") else "") for r in s.device_map})
    return {"device": s.device.type, "device_names": "; ".join(names), "agent_chunk": int(s.spec.agent_chunk),
            "tf32": bool(cuda and s.cfg.train.allow_tf32), "cuda_deterministic": cuda,
            "cuda_version": str(torch.version.cuda or "")}


def resume(out_dir: str, world: dist.World, rounds: int | None = None) -> int:
    """Continue the run in ``out_dir`` from its latest checkpoint (to ``rounds`` in total if given)."""
    def exists():
        if not os.path.isdir(out_dir):
            raise io.OutputError(f"{out_dir}: no such directory (nothing to resume)")
    agreed(world, exists, root_only=True)
    with output_lock(world, out_dir):
        return _resume(out_dir, world, rounds)


def _resume(out_dir: str, world: dist.World, rounds: int | None) -> int:
    # Everything is checked before anything is changed: a refused resume leaves every file as it was.
    meta = agreed(world, lambda: _resume_state(out_dir, rounds), root_only=True)
    cfg_json, round_, path, wall, recorded = dist.broadcast(world, meta)
    cfg = from_json(cfg_json)
    if round_ >= cfg.train.rounds:
        say(world, f"{out_dir}: already complete ({round_} of {cfg.train.rounds} rounds); "
                   "nothing to do (use --rounds N to train further)")
        return EXIT_OK
    s = setup(cfg, world)
    like = initial_params(s)
    expect = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in s.layout.split(like).items()}

    def load_then_cut():
        _, values, _, _ = io.read_checkpoint(path, expect)     # shapes and dtypes checked before any data is read
        io.clean_stale_temps(out_dir)
        dropped = io.truncate_metrics(out_dir, round_)
        if dropped:
            print(f"mpifedmeta: dropped {dropped} metrics rows written after the checkpoint of round {round_}", flush=True)
        return values
    values = dist.broadcast(world, agreed(world, load_then_cut, root_only=True))
    params = s.layout.flatten({k: torch.as_tensor(values[k]) for k in s.layout.names}).to(device=s.device, dtype=s.dtype)
    choose_strategy(s, params, recorded)
    say(world, f"mpifedmeta: {_now()} resuming {out_dir} at round {round_} of {cfg.train.rounds} on {world.size} rank(s)")
    return train(s, out_dir, params, round_, wall)


def _resume_state(out_dir: str, rounds: int | None):
    """(config JSON, round, checkpoint path, wall time, recorded strategy) of the run in ``out_dir``,
    every file's structure and their agreement checked; reads no parameter data and writes nothing."""
    metrics_json, train_rounds, _, mattrs = io.read_metrics_rounds(out_dir)
    ckpts = io.list_checkpoints(out_dir)
    if not ckpts:
        raise io.OutputError(f"{out_dir}: no checkpoints/round_NNNNNN.h5 to resume from")
    named, path = ckpts[-1]
    round_, shapes, ckpt_json, attrs = io.checkpoint_header(path)
    if round_ != named:
        raise io.OutputError(f"{path}: round attribute {round_} does not match the file name (round {named})")
    diffs = io.config_json_equal(metrics_json, ckpt_json, RESUMABLE_KEYS)
    if diffs:
        raise io.OutputError(f"{path}: checkpoint config does not match metrics.h5 ({', '.join(diffs[:5])})")
    if train_rounds[:round_].tolist() != list(range(1, round_ + 1)):
        raise io.OutputError(f"{io.metrics_path(out_dir)}: its train rows do not cover rounds 1..{round_} of the "
                             f"checkpoint {os.path.basename(path)} (they end at round "
                             f"{int(train_rounds[-1]) if len(train_rounds) else 0})")
    try:
        stored = from_json(ckpt_json)
    except ConfigError as e:
        raise io.OutputError(f"{path}: stored config is invalid: {e}") from None
    if attrs.get("strategy") is not None and attrs["strategy"] not in metagrad.STRATEGIES:
        raise io.OutputError(f"{path}: attribute 'strategy' = {str(attrs['strategy'])[:40]!r} is not one of "
                             f"{', '.join(metagrad.STRATEGIES)}")
    wrong = [n for n, (_, dt) in shapes.items() if dt != stored.train.dtype]
    if wrong:
        raise io.OutputError(f"{path}: parameter {wrong[0]} is {shapes[wrong[0]][1]}, train.dtype is {stored.train.dtype}")
    raw = json.loads(stored.to_json())
    raw["output"]["dir"] = out_dir
    if rounds is not None:
        if rounds < round_:
            raise ConfigError(f"--rounds {rounds} is before the checkpoint's round {round_}")
        raw["train"]["rounds"] = rounds
    cfg = from_json(json.dumps(raw))
    num_params = mattrs.get("num_params")
    if round_ >= cfg.train.rounds and isinstance(num_params, (int, np.integer)) and shapes:
        # complete: no model is built, so compare the declared sizes with the run's (no data is read)
        declared = sum(math.prod(shape) for shape, _ in shapes.values())
        big = max(shapes, key=lambda n: math.prod(shapes[n][0]))
        if declared != int(num_params):
            raise io.OutputError(f"{path}: the checkpoint declares {declared} parameters (largest: {big} "
                                 f"{shapes[big][0]}), the run has {int(num_params)} (metrics.h5)")
    return cfg.to_json(), round_, path, float(attrs.get("wall_time", 0.0)), attrs.get("strategy")


def auto_resume_or_start(cfg: Config, world: dist.World) -> int:
    """`run --auto-resume`: resume OUT if it holds a run of the same config, else start it."""
    out_dir = cfg.output.dir
    agreed(world, lambda: check_output_dir(out_dir), root_only=True)
    with output_lock(world, out_dir):
        def holds_run():
            if not os.path.lexists(io.metrics_path(out_dir)):
                return False
            # both through validation, so that keys added since the run was made compare at their defaults
            stored = from_json(io.read_metrics_config(out_dir)).to_json()
            diffs = io.config_json_equal(stored, cfg.to_json(), RESUMABLE_KEYS)
            if diffs:
                raise ConfigError(f"output.dir = {out_dir!r} holds a run with a different config "
                                  f"({', '.join(diffs[:5])}); choose another output.dir")
            return True
        if not dist.broadcast(world, agreed(world, holds_run, root_only=True)):
            return _start_new(cfg, world)
        return _resume(out_dir, world, cfg.train.rounds)
