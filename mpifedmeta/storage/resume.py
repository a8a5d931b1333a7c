"""What a resume continues from: the newest checkpoint and metrics.h5, checked against each other
and against the stored config before anything is changed (a refused resume changes no file)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from mpifedmeta.engine import backends
from mpifedmeta.run.config import ConfigError, from_json
from mpifedmeta.storage import checkpoint, hdf5, metrics


@dataclass(frozen=True)
class ResumePoint:
    config_json: str        # the run's config (output.dir and --rounds applied)
    round: int              # the checkpoint's round
    path: str               # the checkpoint file
    wall_time: float
    recorded: dict          # {"strategy", "agent_chunk"} the run was started with


def resume_point(out_dir: str, rounds: int | None, resumable: dict) -> ResumePoint:
    """What the run in ``out_dir`` continues from, every file's structure and their agreement
    checked (``resumable``: config keys that may differ); reads no parameter data, writes nothing."""
    run = metrics.read(out_dir, strict=True)
    metrics_json, train_rounds, mattrs = json.dumps(run.config), run.train["round"], run.attrs
    ckpts = checkpoint.list_all(out_dir)
    if not ckpts:
        raise hdf5.OutputError(f"{out_dir}: no checkpoints/round_NNNNNN.h5 to resume from")
    named, path = ckpts[-1]
    round_, shapes, ckpt_json, attrs = checkpoint.header(path)
    if round_ != named:
        raise hdf5.OutputError(f"{path}: round attribute {round_} does not match the file name (round {named})")
    diffs = hdf5.config_json_equal(metrics_json, ckpt_json, resumable)
    if diffs:
        raise hdf5.OutputError(f"{path}: checkpoint config does not match metrics.h5 ({', '.join(diffs[:5])})")
    if train_rounds[:round_].tolist() != list(range(1, round_ + 1)):
        raise hdf5.OutputError(f"{metrics.path_of(out_dir)}: its train rows do not cover rounds 1..{round_} of the "
                             f"checkpoint {os.path.basename(path)} (they end at round "
                             f"{int(train_rounds[-1]) if len(train_rounds) else 0})")
    try:
        stored = from_json(ckpt_json)
    except ConfigError as e:
        raise hdf5.OutputError(f"{path}: stored config is invalid: {e}") from None
    if attrs.get("strategy") is not None and attrs["strategy"] not in backends.BACKENDS:
        raise hdf5.OutputError(f"{path}: attribute 'strategy' = {str(attrs['strategy'])[:40]!r} is not one of "
                             f"{', '.join(backends.BACKENDS)}")
    wrong = [n for n, (_, dt) in shapes.items() if dt != stored.train.dtype]
    if wrong:
        raise hdf5.OutputError(f"{path}: parameter {wrong[0]} is {shapes[wrong[0]][1]}, train.dtype is {stored.train.dtype}")
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
            raise hdf5.OutputError(f"{path}: the checkpoint declares {declared} parameters (largest: {big} "
                                 f"{shapes[big][0]}), the run has {int(num_params)} (metrics.h5)")
    chunk = attrs.get("agent_chunk")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0):
        raise hdf5.OutputError(f"{path}: attribute 'agent_chunk' = {str(chunk)[:40]!r} is not an integer >= 0")
    z = attrs.get("privacy_noise_multiplier")
    if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float, np.floating)) or not z >= 0):
        raise hdf5.OutputError(f"{path}: attribute 'privacy_noise_multiplier' = {str(z)[:40]!r} is not a number >= 0")
    recorded = {"strategy": attrs.get("strategy"), "agent_chunk": None if chunk is None else int(chunk),
                "noise_multiplier": None if z is None else float(z)}
    return ResumePoint(cfg.to_json(), round_, path, float(attrs.get("wall_time", 0.0)), recorded)
