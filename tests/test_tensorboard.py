"""output.tensorboard: event files under OUT/tensorboard/ that follow metrics.h5 (tags, steps, values, the
config text), a requeued resume that supersedes the interrupted attempt's later steps (each step seen once),
the key off (no directory, no package needed), the package missing (exit 2, one line, nothing written), an
unwritable directory or a failing disk (one warning line, the run goes on).

Serial: the CLI runs as subprocesses (the first run under mpiexec -n 2: rank 0 alone writes); the events are
read back with TensorBoard's own EventAccumulator.
"""

import json
import os

import numpy as np
import pytest

from helpers import (assert_ok, assert_one_error_line, checkpoint_path, checkpoint_rounds, copy_run, describe,
                     file_hashes, read_metrics, run_cli, sets)

pytest.importorskip("tensorboard", reason="the [tb] extra: pip install -e '.[tb]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mpifedmeta.storage import metrics, tensorboard  # noqa: E402

KS = [0, 1, 2]                      # the tiny config's eval.finetune_steps
TRAIN_TAGS = {f"train/{c}" for c in metrics.TRAIN_COLUMNS if c != "round"}
EVAL_TAGS = {f"eval/{s}_{m}_k{k}" for s in ("train", "holdout") for m in ("acc", "loss") for k in KS}
TB = sets(output__tensorboard=True)


def read_events(out: str) -> EventAccumulator:
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> tuple[list[int], np.ndarray]:
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events], dtype=np.float32)


def summary_steps(path: str) -> list[int]:
    """The steps of one event file's summaries."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    return [e.step for e in EventFileLoader(path).Load() if e.HasField("summary")]


def config_texts(acc: EventAccumulator) -> dict[int, dict]:
    """step -> the config of the `config` text (a header line, then the JSON indented as a code block)."""
    out = {}
    for e in acc.Tensors("config"):
        text = e.tensor_proto.string_val[0].decode()
        assert text.startswith("mpifedmeta config (")
        out.setdefault(e.step, []).append(json.loads("\n".join(line[4:] for line in text.split("\n\n", 1)[1].splitlines())))
    assert all(len(v) == 1 for v in out.values()), f"a config step seen twice: {sorted(out)}"
    return {step: v[0] for step, v in out.items()}


def assert_events_follow_metrics(out: str, eval_tags=EVAL_TAGS) -> EventAccumulator:
    """Every train column at steps 1..R and every eval mean at the eval rounds, once each, values equal to
    metrics.h5's (as the float32 TensorBoard stores)."""
    m, acc = read_metrics(out), read_events(out)
    assert set(acc.Tags()["scalars"]) == TRAIN_TAGS | set(eval_tags)
    rounds, eval_rounds = m["train/round"].tolist(), m["eval/round"].tolist()
    for tag in TRAIN_TAGS:
        steps, values = series(acc, tag)
        assert steps == rounds, tag
        assert np.array_equal(values, m[tag].astype(np.float32)), tag
    for tag in eval_tags:
        steps, values = series(acc, tag)
        assert steps == eval_rounds, tag
        name, k = tag[len("eval/"):].rsplit("_k", 1) if "_k" in tag else (tag[len("eval/"):], None)
        stored = m[f"eval/{name}_mean"] if k is None else m[f"eval/{name}_mean"][:, KS.index(int(k))]
        assert np.array_equal(values, stored.astype(np.float32)), tag
    return acc


@pytest.fixture(scope="module")
def tb_run(base_dir, cfg_path):
    """4 rounds with output.tensorboard = true on 2 ranks (checkpoints 0, 2, 4; evaluations 0, 2, 4)."""
    out = str(base_dir / "tb")
    proc = run_cli(["run", cfg_path] + TB + sets(output__dir=out), np_=2)
    assert_ok(proc)
    assert "warning" not in proc.stderr, describe(proc)
    return out


def test_events_follow_metrics(tb_run):
    names = os.listdir(os.path.join(tb_run, "tensorboard"))
    assert len(names) == 1 and names[0].startswith("events.out.tfevents."), names     # rank 0 only
    acc = assert_events_follow_metrics(tb_run)
    m = read_metrics(tb_run)
    assert m["train/round"].tolist() == [1, 2, 3, 4] and m["eval/round"].tolist() == [0, 2, 4]
    assert series(acc, "eval/train_acc_k1")[0] == [0, 2, 4]         # round 0's evaluation is step 0
    stored = metrics.read(tb_run).config
    assert config_texts(acc) == {0: stored}
    assert stored["output"]["tensorboard"] is True


def test_resume_after_requeue_sees_each_step_once(tb_run, tmp_path):
    """The newest checkpoint is round 2 (round 4's removed, as if the job died after writing events of
    rounds 3 and 4), and the interrupted attempt also wrote a step 5 and odd values: the resume purges
    every step > 2, so each step is seen once, with the values of metrics.h5."""
    out = copy_run(tb_run, str(tmp_path / "requeued"))
    os.remove(checkpoint_path(out, 4))
    assert checkpoint_rounds(out)[-1] == 2
    _odd_tail(os.path.join(out, "tensorboard"))
    proc = run_cli(["resume", out, "--rounds", "6"])
    assert_ok(proc)
    m = read_metrics(out)
    assert m["train/round"].tolist() == [1, 2, 3, 4, 5, 6] and m["eval/round"].tolist() == [0, 2, 4, 6]
    acc = assert_events_follow_metrics(out)
    names = sorted(os.listdir(os.path.join(out, "tensorboard")))
    assert len(names) == 3                  # the run's, the odd tail, the resume's (in this order)
    # cut from the older files too, for readers that ignore the purge event (TensorBoard's Rust data server)
    for name in names[:-1]:
        assert max(summary_steps(os.path.join(out, "tensorboard", name)), default=0) <= 2, name
    assert min(summary_steps(os.path.join(out, "tensorboard", names[-1]))) == 3
    texts = config_texts(acc)
    assert sorted(texts) == [0, 3]                      # the run's config, and the one the resume continues with
    assert texts[0]["train"]["rounds"] == 4 and texts[3]["train"]["rounds"] == 6


def _odd_tail(directory: str) -> None:
    """An event file like the interrupted attempt's last one: steps 3..5 with values no run writes (named
    to sort after the run's file: readers load a directory's files in name order)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    stamp = max(int(n[len("events.out.tfevents."):].split(".")[0]) for n in os.listdir(directory))
    with open(os.path.join(directory, f"events.out.tfevents.{stamp + 1:010d}.interrupted.1.0"), "wb") as f:
        w = RecordWriter(f)
        w.write(event_pb2.Event(file_version="brain.Event:2").SerializeToString())
        for step in (3, 4, 5):
            values = [summary_pb2.Summary.Value(tag=t, simple_value=-1.0) for t in sorted(TRAIN_TAGS | EVAL_TAGS)]
            w.write(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)).SerializeToString())


def test_personalized_columns(cfg_path, tmp_path):
    out = str(tmp_path / "ditto")
    assert_ok(run_cli(["run", cfg_path] + TB + sets(algorithm__name="ditto", train__rounds=2, output__dir=out)))
    personal = {f"eval/{n}" for n in ("personal_acc", "personal_loss", "holdout_personal_acc",
                                      "holdout_personal_loss")}
    assert_events_follow_metrics(out, EVAL_TAGS | personal)


def _hide_tensorboard(tmp_path) -> dict:
    """PYTHONPATH with a `tensorboard` package that cannot be imported (as if the extra were not installed)."""
    shim = tmp_path / "no-tensorboard"
    (shim / "tensorboard").mkdir(parents=True)
    (shim / "tensorboard" / "__init__.py").write_text(
        "raise ImportError('No module named tensorboard (hidden by tests/test_tensorboard.py)')\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)}


def test_key_off_needs_no_package_and_writes_no_directory(cfg_path, tmp_path):
    out = str(tmp_path / "off")
    proc = run_cli(["run", cfg_path] + sets(train__rounds=1, output__dir=out), env=_hide_tensorboard(tmp_path))
    assert_ok(proc)
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "metrics.h5"]


def test_missing_package_exits_2_before_anything_is_written(cfg_path, tmp_path):
    out = str(tmp_path / "missing")
    proc = run_cli(["run", cfg_path] + TB + sets(output__dir=out), env=_hide_tensorboard(tmp_path))
    assert_one_error_line(proc, 2, "output.tensorboard", "tensorboard package", ".[tb]")
    assert not os.path.exists(out)


def test_resume_without_package_exits_2_and_changes_nothing(tb_run, tmp_path):
    out = copy_run(tb_run, str(tmp_path / "resume-missing"))
    before = file_hashes(out)
    proc = run_cli(["resume", out, "--rounds", "6"], env=_hide_tensorboard(tmp_path))
    assert_one_error_line(proc, 2, "output.tensorboard", ".[tb]")
    after = file_hashes(out)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


def test_unwritable_directory_is_one_warning_and_the_run_goes_on(cfg_path, tmp_path):
    """OUT/tensorboard is a file (as good as a directory that cannot be written, also as root)."""
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "tensorboard").write_text("not a directory")
    proc = run_cli(["run", cfg_path] + TB + sets(output__dir=str(out)))
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("mpifedmeta: warning: TensorBoard events stopped"), \
        describe(proc)
    assert read_metrics(str(out))["train/round"].tolist() == [1, 2, 3, 4]
    assert checkpoint_rounds(str(out)) == [0, 2, 4]


# --------------------------------------------------------------------------- the writer in-process

def _config(tmp_path):
    from mpifedmeta.run.config import load
    return load(None, [f"output.dir={json.dumps(str(tmp_path))}", "output.tensorboard=true",
                       "eval.finetune_steps=[0, 1]", "train.rounds=3"])


def _rows(rounds, value):
    return [{"round": r, "train_loss": value, "wall_time": float(r), "round_time": 1.0, "num_sampled": 5}
            for r in rounds]


def _eval_row(r, value):
    return {"round": r, "train_acc_mean": np.array([value, value]), "train_loss_mean": np.array([value, value]),
            "holdout_acc_mean": np.full(2, np.nan), "holdout_loss_mean": np.full(2, np.nan),
            "meta_loss_full": np.nan, "grad_norm_sq": np.nan}


def test_a_new_run_supersedes_stale_events(tmp_path):
    """Events of an earlier run left in the directory (its metrics.h5 deleted) are purged at step 0."""
    cfg = _config(tmp_path)
    old = tensorboard.Events.start(cfg, str(tmp_path), 0, True, first_eval=_eval_row(0, 5.0))
    old.write(_rows([1, 2, 3], 5.0), [_eval_row(2, 5.0)])
    old.close()
    new = tensorboard.Events.start(cfg, str(tmp_path), 0, True, first_eval=_eval_row(0, 0.5))
    new.write(_rows([1], 0.5), [])
    new.close()
    acc = read_events(str(tmp_path))
    assert series(acc, "train/train_loss")[0] == [1] and set(series(acc, "train/train_loss")[1]) == {0.5}
    assert series(acc, "eval/train_acc_k1")[0] == [0] and set(series(acc, "eval/train_acc_k1")[1]) == {0.5}
    assert "eval/holdout_acc_k0" not in acc.Tags()["scalars"]           # NaN (no holdout agents): not written
    assert not [t for t in acc.Tags()["scalars"] if "meta_loss_full" in t or "grad_norm" in t]
    assert sorted(config_texts(acc)) == [0]


def test_a_failing_disk_is_one_warning_and_never_raises(tmp_path, monkeypatch, capfd):
    import errno
    events = tensorboard.Events.start(_config(tmp_path), str(tmp_path), 0, True, first_eval=_eval_row(0, 0.5))
    assert capfd.readouterr().err == ""

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tensorboard.os, "fsync", full)
    events.write(_rows([1], 1.0), [])           # fails: one warning, then off
    events.write(_rows([2], 1.0), [])           # off: silent
    events.close()
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mpifedmeta: warning: TensorBoard events stopped"), err
    assert "No space left on device" in err[0] and "metrics.h5" in err[0]


def test_off_on_other_ranks_and_when_the_key_is_false(tmp_path):
    from mpifedmeta.run.config import load
    cfg = _config(tmp_path)
    tensorboard.Events.start(cfg, str(tmp_path), 0, False, first_eval=_eval_row(0, 0.5)).write(_rows([1], 1.0), [])
    off = load(None, [f"output.dir={json.dumps(str(tmp_path))}"])
    assert off.output.tensorboard is False
    tensorboard.Events.start(off, str(tmp_path), 0, True, first_eval=_eval_row(0, 0.5)).write(_rows([1], 1.0), [])
    assert not os.path.exists(os.path.join(str(tmp_path), "tensorboard"))
