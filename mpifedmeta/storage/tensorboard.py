"""Live curves: TensorBoard event files under ``OUT/tensorboard/`` (``output.tensorboard = true``).

Rank 0 writes them from the place that appends the metrics rows (``runner._Writer``), right after each
append to metrics.h5 and before the checkpoint, and flushes them with it (file flushed and fsync'ed):
the curves follow ``metrics.h5`` row for row. Steps are rounds:

- ``train/<column>`` for every column of metrics.h5's ``train`` table (``train/train_loss``,
  ``train/wall_time``, ..., ``train/epsilon`` in private runs; not ``round``, the step), steps 1..R;
- ``eval/<train|holdout>_<acc|loss>_k<k>`` (the means over agents after k fine-tuning steps,
  ``eval.finetune_steps``), ``eval/personal_acc``, ``eval/personal_loss``, ``eval/holdout_personal_acc``,
  ``eval/holdout_personal_loss`` (algorithms with a personalized model) and ``eval/meta_loss_full``,
  ``eval/grad_norm_sq`` (``eval.stationarity``), at the evaluation rounds (round 0 = the initial model);
  NaN values (no holdout agents, no stationarity) are not written;
- ``config``: the resolved config as text, at step 0 (a resume adds the config it continues with at
  its first step, r + 1).

Each start writes a new event file in the same directory. A resume from the checkpoint of round r
supersedes the events of steps > r that the interrupted attempt wrote, so that every step is seen once:
the new file begins with a purge at step r + 1 (what torch's ``SummaryWriter(purge_step=r + 1)``
writes: a ``SessionLog.START`` event at that step, for TensorBoard processes that already loaded the
older events), and those events are also cut from the older files (each rewritten atomically, only
where something goes), because TensorBoard's default loader (the Rust data server) ignores the purge
event. A new run supersedes from step 0 (events of an earlier run left in the directory). Files are
named so that their order is the order of the attempts (also when a requeue's node clock is behind).

Written synchronously with tensorboard's own record writer and protos (the events are those torch's
``SummaryWriter`` writes, scalars as float32 ``simple_value``): ``SummaryWriter`` writes from a
background thread, whose failure surfaces late and prints a traceback, and its file layer imports
TensorFlow wherever that is installed.

Events are a convenience, ``metrics.h5`` is the record: any failure here (full disk, unwritable
directory, broken install) prints one warning line on rank 0, stops the events for the rest of the
run, and the run goes on; nothing here raises into the round loop. The ``tensorboard`` package is an
optional extra (``pip install -e '.[tb]'``), imported only when the key is true; without it a config
with ``output.tensorboard = true`` is refused when it is read (exit 2), before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

DIR = "tensorboard"
INSTALL = "pip install -e '.[tb]' in the mpifedmeta checkout (or pip install 'mpifedmeta[tb]')"
_PREFIX = "events.out.tfevents."
_TMP = ".rewrite.tmp-"


def missing() -> str | None:
    """Why ``output.tensorboard = true`` cannot be used here (the config check), or None."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return f"needs the tensorboard package, which is not installed: {INSTALL}"
    return None


def train_scalars(row: dict) -> list[tuple[str, float]]:
    """(tag, value) of one train row: every column of metrics.h5's train table but ``round``
    (``epsilon`` too in differentially private runs)."""
    from mpifedmeta.storage.metrics import OPTIONAL_TRAIN, TRAIN_COLUMNS
    return [(f"train/{name}", float(row[name])) for name in {**TRAIN_COLUMNS, **OPTIONAL_TRAIN}
            if name != "round" and name in row]


def eval_scalars(row: dict, ks: list[int]) -> list[tuple[str, float]]:
    """(tag, value) of one evaluation row (NaN values left out)."""
    from mpifedmeta.storage.metrics import EVAL_MEANS, EVAL_SCALARS, PERSONAL_MEANS
    out = []
    for name in EVAL_MEANS:                         # e.g. train_acc_mean (K,) -> eval/train_acc_k0, ...
        values = [float(v) for v in _flat(row.get(name))]
        if len(values) == len(ks):
            out += [(f"eval/{name[:-len('_mean')]}_k{k}", v) for k, v in zip(ks, values)]
    for name in PERSONAL_MEANS:                     # personal_acc_mean -> eval/personal_acc
        if name in row:
            out.append((f"eval/{name[:-len('_mean')]}", float(_flat(row[name])[0])))
    for name in EVAL_SCALARS:                       # meta_loss_full, grad_norm_sq (eval.stationarity)
        if name in row and row[name] is not None:
            out.append((f"eval/{name}", float(_flat(row[name])[0])))
    return [(tag, v) for tag, v in out if not math.isnan(v)]


def _flat(value) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):                    # numpy arrays, torch tensors, numpy scalars
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Events:
    """Rank 0's event file of one start (new run or resume); does nothing where it is off (another
    rank, the key false, or after a failure). Its methods never raise."""

    def __init__(self):
        self.path: str | None = None
        self._file = None
        self._record = None
        self._pb = None
        self.ks: list[int] = []

    @classmethod
    def start(cls, cfg, out_dir: str, start_round: int, is_root: bool, first_eval: dict | None = None) -> "Events":
        """Open the events of a run that continues from ``start_round``: a new run when
        ``first_eval`` (its round-0 evaluation row, already in metrics.h5) is given, else a resume
        from the checkpoint of ``start_round``."""
        events = cls()
        if not (is_root and cfg.output.tensorboard):
            return events
        events.ks = [int(k) for k in cfg.eval.finetune_steps]
        new = first_eval is not None
        step = 0 if new else start_round + 1       # the purge step, and the step of the config text
        events.path = os.path.join(out_dir, DIR)
        try:
            events._open(events.path, purge_step=step)
            how = "new run" if new else f"resumed from the checkpoint of round {start_round}"
            text = f"mpifedmeta config ({how}):\n\n" + "\n".join(
                "    " + line for line in json.dumps(cfg.raw, indent=2, sort_keys=True).splitlines())
            events._text("config", text, step)
            if new:
                events._scalars(0, eval_scalars(first_eval, events.ks), time.time())
            events._flush()
        except Exception as e:                      # noqa: BLE001 -- events never stop a run
            events._fail(e)
        return events

    def write(self, train_rows: list[dict], eval_rows: list[dict]) -> None:
        """The rows just appended to metrics.h5, then flushed to disk."""
        if self._file is None or not (train_rows or eval_rows):
            return
        try:
            now = time.time()
            # a row's wall-clock time: now, less the training time since it (rows come in batches)
            last = max((float(r["wall_time"]) for r in train_rows), default=0.0)
            when = {int(r["round"]): now - (last - float(r["wall_time"])) for r in train_rows}
            for r in train_rows:
                self._scalars(int(r["round"]), train_scalars(r), when[int(r["round"])])
            for r in eval_rows:
                self._scalars(int(r["round"]), eval_scalars(r, self.ks), when.get(int(r["round"]), now))
            self._flush()
        except Exception as e:                      # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception as e:                  # noqa: BLE001
                self._fail(e)
            self._file = None

    # ------------------------------------------------------------------ the file

    def _open(self, directory: str, purge_step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.record_writer import RecordWriter
        self._pb = (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2, text_metadata)
        os.makedirs(directory, exist_ok=True)
        _supersede(directory, purge_step, event_pb2)
        # readers load a directory's event files in name order: name this one after every file there
        stamp = max([int(time.time())] + [_stamp(n) + 1 for n in os.listdir(directory) if _stamp(n) >= 0])
        while True:
            path = os.path.join(directory, f"{_PREFIX}{stamp:010d}.{socket.gethostname()}.{os.getpid()}.0")
            try:
                self._file = open(path, "xb")      # never another attempt's file
                break
            except FileExistsError:
                stamp += 1
        self.path = path
        self._record = RecordWriter(self._file)
        now = time.time()
        self._record.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2",
                                           source_metadata=event_pb2.SourceMetadata(writer="mpifedmeta"))
                           .SerializeToString())
        # TensorBoard drops the events of steps >= purge_step that it read before (older files)
        self._record.write(event_pb2.Event(wall_time=now, step=purge_step, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)).SerializeToString())

    def _scalars(self, step: int, values: list[tuple[str, float]], wall: float) -> None:
        event_pb2, summary_pb2 = self._pb[:2]
        if values:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values])
            self._record.write(event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString())

    def _text(self, tag: str, text: str, step: int) -> None:
        event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2, text_metadata = self._pb
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor,
                                          metadata=text_metadata.create_summary_metadata(tag, "the resolved config"))
        self._record.write(event_pb2.Event(wall_time=time.time(), step=step,
                                           summary=summary_pb2.Summary(value=[value])).SerializeToString())

    def _flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _fail(self, e: BaseException) -> None:
        """One warning line (os.write: this may run in the stop-signal handler), then off."""
        where = self.path or DIR       # the file, or the directory if it could not be opened
        text = " ".join(str(e).split()) or type(e).__name__
        os.write(2, f"mpifedmeta: warning: TensorBoard events stopped ({where}: {text}); the run goes on, "
                    "metrics.h5 and the checkpoints are the record\n".encode())
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:                       # noqa: BLE001 -- already reported
                pass


def _supersede(directory: str, step: int, event_pb2) -> None:
    """Drop the events of steps >= ``step`` from the event files already in ``directory`` (each
    rewritten atomically, only where something goes; a torn last record goes too). The purge event
    alone would do for TensorBoard's Python loaders, but its default loader (the Rust data server)
    and the legacy EventAccumulator's text tags ignore it."""
    for name in os.listdir(directory):
        if name.startswith(_TMP):              # a rewrite that died (the run's lock: no other writer)
            os.remove(os.path.join(directory, name))
    for name in sorted(n for n in os.listdir(directory) if _stamp(n) >= 0):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        keep, pos, changed = [], 0, False
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8]) if pos + 8 <= len(data) else (len(data),)
            end = pos + 12 + n + 4
            try:
                if end > len(data):
                    raise ValueError("torn record")
                event = event_pb2.Event.FromString(data[pos + 12:end - 4])
            except Exception:                   # noqa: BLE001 -- torn or foreign tail: dropped
                changed = True
                break
            if event.step >= step and (event.HasField("summary") or event.HasField("session_log")):
                changed = True
            else:
                keep.append(data[pos:end])
            pos = end
        if changed:
            tmp = os.path.join(directory, f"{_TMP}{os.getpid()}")     # not a "tfevents" name: never read
            try:
                with open(tmp, "wb") as f:
                    f.write(b"".join(keep))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)


def _stamp(name: str) -> int:
    """The time stamp in an event file's name (``events.out.tfevents.STAMP.host...``), else -1."""
    if not name.startswith(_PREFIX):
        return -1
    field = name[len(_PREFIX):].split(".", 1)[0]
    return int(field) if field.isdigit() else -1
