"""The round loop: rounds, metrics rows, checkpoints, signals, the closing table (the set-up is in
session.py, the starts and resumes in start.py). Every rank runs the same code; only rank 0 writes
and prints.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mpifedmeta.core import exactsum
from mpifedmeta.parallel import dist
from mpifedmeta.privacy import accountant
from mpifedmeta.run import signals
from mpifedmeta.run.console import Progress, final_table, say
from mpifedmeta.run.protocol import agreed
from mpifedmeta.run.session import Setup
from mpifedmeta.storage import checkpoint, metrics, tensorboard

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_DIVERGED, EXIT_DISK_FULL = 0, 1, 2, 3, 4, 5


def model_arrays(s: Setup, w: torch.Tensor) -> dict[str, np.ndarray]:
    """The flat global model as {parameter name: array} (the checkpoint's datasets)."""
    return {k: v.numpy() for k, v in s.layout.split(w.detach().cpu()).items()}


def checkpoint_groups(s: Setup, server_state: dict, agent_state) -> dict:
    """The checkpoint's state besides the model: the server optimizer's arrays and, for a stateful
    algorithm, every agent's (``agent_state`` = (values, has) gathered on rank 0)."""
    groups = {"server": dict(server_state)} if server_state else {}
    if agent_state is not None:
        groups["agent_state"] = {"values": agent_state[0], "has": agent_state[1]}
    return groups


def checkpoint_attrs(s: Setup, wall: float) -> dict:
    return {"wall_time": wall, "strategy": s.strategy, "rng": "counter-based: (seed, round, agent, step)",
            "agent_chunk": s.round.spec.agent_chunk, "algorithm": s.round.spec.algorithm.name,
            "server_optimizer": s.round.spec.server.optimizer, **privacy_attrs(s)}


def privacy_attrs(s: Setup) -> dict:
    """The DP mechanism's parameters (the calibrated z among them: a resume keeps it), or {}."""
    p = s.round.spec.privacy
    if p is None:
        return {}
    return {"privacy_noise_multiplier": p.noise_multiplier, "privacy_clip": p.clip, "privacy_q": p.q,
            "privacy_delta": p.delta, "privacy_sampling": p.sampling, "privacy_accountant": p.accountant}


class _Writer:
    """Rank 0's files during training: metrics rows not yet written and checkpoints, and the stop
    checkpoint that a signal asks for.

    On a stop signal the handler calls :meth:`on_stop`: if the last completed round's checkpoint is
    not on disk yet, it is written at once (a launcher may SIGKILL a second later, long before the
    current round ends); the loop still finishes its round and checkpoints that one too. Every write
    of the loop goes through :func:`agreed`, so a full disk ends every rank with exit 5.
    """

    def __init__(self, s: "Setup", out_dir: str, round_: int, params: dict, wall: float, first_eval: dict | None = None):
        self.s, self.out_dir = s, out_dir
        self.train: list[dict] = []
        self.eval: list[dict] = []
        self.stateful = s.round.state is not None
        self.on_disk = round_                   # the newest round whose checkpoint is written
        self.busy = False
        self.completed(round_, params, wall)    # self.done: the last completed round, its checkpoint groups
        # TensorBoard events (output.tensorboard): written with the metrics rows, never raise
        self.events = tensorboard.Events.start(s.cfg, out_dir, round_, s.world.is_root, first_eval)

    def completed(self, round_: int, params: dict, wall: float, agent_state=None) -> None:
        """The round's results; ``agent_state``: every agent's state, gathered (checkpoint rounds)."""
        groups = None if self.stateful and agent_state is None else \
            checkpoint_groups(self.s, self.s.round.server_state, agent_state)
        self.done = (round_, params, wall, groups)

    def _write(self, with_checkpoint: bool) -> None:
        """Rank 0: the pending rows (metrics first: a crash in between leaves rows the resume
        truncates), then the last completed round's checkpoint if asked and not yet on disk."""
        self.busy = True
        try:
            metrics.append(self.out_dir, self.train, self.eval)
            self.events.write(self.train, self.eval)
            self.train, self.eval = [], []
            r, params, wall, groups = self.done
            if with_checkpoint and self.on_disk != r and groups is not None:
                checkpoint.write(self.out_dir, r, model_arrays(self.s, params), self.s.cfg.to_json(),
                                 checkpoint_attrs(self.s, wall), self.s.cfg.output.keep, groups)
                self.on_disk = r
        finally:
            self.busy = False

    def flush(self, with_checkpoint: bool = False) -> None:
        """On every rank: rank 0 writes, every rank learns whether it worked."""
        agreed(self.s.world, (lambda: self._write(with_checkpoint)) if self.s.world.is_root else None,
               root_only=True, errors=())
        self.train, self.eval = [], []

    def on_stop(self) -> None:
        """Signal-handler hook (main thread, between two bytecodes); never raises."""
        if not self.s.world.is_root or self.busy or self.on_disk >= self.done[0] or self.done[3] is None:
            return                  # a write in progress, nothing new, or per-agent state not gathered
                                    # for this round: the loop's own write follows
        try:
            self._write(True)
            text = f"mpifedmeta: {_now()} stop signal: checkpoint of the last completed round {self.on_disk} written\n"
        except Exception as e:      # e.g. disk full: the loop's own write reports it
            text = f"mpifedmeta: stop signal: could not write a checkpoint at once: {str(e).splitlines()[0]}\n"
        os.write(2, text.encode())  # not print(): the handler may have interrupted a print


def _due(round_: int, every: int, last: int) -> bool:
    return round_ % every == 0 or round_ == last


def train(s: Setup, out_dir: str, w: torch.Tensor, start_round: int, wall0: float, first_eval: dict | None = None) -> int:
    """Rounds start_round+1 .. cfg.train.rounds from the global model ``w``; returns the exit code
    (0 done, 3 stopped by a signal, 4 diverged). ``first_eval``: a new run's round-0 evaluation row."""
    cfg, R = s.cfg, s.cfg.train.rounds
    writer = _Writer(s, out_dir, start_round, w, wall0, first_eval)
    progress = Progress(s.world, start_round, R, cfg.output.progress_every)
    last_eval, wall, code = None, wall0, EXIT_OK
    privacy = s.round.spec.privacy
    ledger = accountant.Ledger(privacy, start_round) if privacy is not None and s.world.is_root else None
    signals.on_stop(writer.on_stop)
    try:
        for r in range(start_round + 1, R + 1):
            t0 = time.perf_counter()
            _maybe_inject_failure(s.world, r)
            # the round: cohort, local round on every rank, server step (federation/algorithm.py)
            result = s.round.run(w, r)
            # every rank agrees whether to stop; the slowest and fastest rank's compute time
            slowest, fastest, stop = dist.round_status(s.world, result.compute_time, bool(signals.requested()))
            if result.w is None:
                code = _report_divergence(s.world, r, result.bad)
                break
            w, round_time = result.w, time.perf_counter() - t0
            wall += round_time
            row = {"round": r, "train_loss": result.train_loss, "wall_time": wall, "round_time": round_time,
                   "num_sampled": result.num_sampled, "compute_time": slowest, "compute_time_min": fastest,
                   **result.timings}
            if ledger is not None:
                row["epsilon"] = ledger.advance()
            writer.train.append(row)
            # the personalized evaluation, every eval.every rounds and at the end
            evaluated = _due(r, cfg.eval.every, R)
            if evaluated:
                last_eval = s.round.evaluate(w, r)
                if s.world.is_root:
                    writer.eval.append(last_eval)
            # metrics rows and checkpoints: rank 0 writes, every rank learns whether it worked
            checkpointed = _due(r, cfg.output.checkpoint_every, R) or stop
            writer.completed(r, w, wall, s.round.agent_state() if checkpointed else None)
            progress.update(r, R, result.train_loss, round_time, last_eval if evaluated else None, row.get("epsilon"))
            if checkpointed or evaluated:
                writer.flush(with_checkpoint=checkpointed)
            if signals.requested():
                writer.on_stop()
            if stop and r < R:
                code = _report_stop(s.world, r, out_dir)
                break
    finally:
        signals.on_stop(None)
        progress.close()
    writer.flush()
    writer.events.close()
    if code == EXIT_OK:
        _finish(s, out_dir, last_eval, wall)
    return code


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
        run = metrics.read(out_dir)
        if run.eval_round.size:
            last_eval = {k: getattr(run, f"final_{k}") for k in metrics.EVAL_AGENTS}
            last_eval.update({k[len("final_"):]: v for k, v in run.personal.items() if k.startswith("final_")})
    if last_eval is not None:
        print(final_table(list(s.cfg.eval.finetune_steps), last_eval), flush=True)
    p = s.round.spec.privacy
    if p is not None:
        eps = metrics.read(out_dir).train.get("epsilon", np.zeros(0))
        print(f"privacy: epsilon = {eps[-1] if eps.size else float('nan'):.4g} at delta = {p.delta:.3g} "
              f"(noise multiplier z = {p.noise_multiplier:.4g}, clip C = {p.clip:g}, q = {p.q:.4g}, "
              f"{p.sampling} sampling, {p.accountant} accountant)", flush=True)
    print(f"done: {s.cfg.train.rounds} rounds, {wall:.1f} s of training; results in {out_dir}", flush=True)


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
