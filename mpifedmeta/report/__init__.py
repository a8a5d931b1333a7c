"""``mpifedmeta report``: plots and a Markdown summary from one or more runs' ``OUT/metrics.h5``.

The files are read by :func:`mpifedmeta.storage.metrics.read` (the one reader of the layout in
``docs/hdf5-layout.md``); :mod:`.tables` writes the Markdown tables, :mod:`.plots` the images
(matplotlib is imported only when drawing). Every file is written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from mpifedmeta.storage import files, hdf5, metrics
from mpifedmeta.storage.results import RunMetrics
from . import plots
from .tables import experiment_groups, fmt_value, seed_table, summary

__all__ = ["ReportError", "RunMetrics", "load_run", "make_report", "default_label", "experiment_groups",
           "REPORT_FILES"]

#: File names written by :func:`make_report`, in order.
REPORT_FILES = ("accuracy.png", "loss.png", "distribution.png", "train_loss.png", "summary.md")
STATIONARITY_FILE = "stationarity.png"   # written only when some run tracked ‖∇F(w)‖² (eval.stationarity)
PERSONAL_FILE = "personal.png"           # written only when some run's algorithm has a personalized model
PRIVACY_FILE = "privacy.png"             # written only when some run is differentially private (train/epsilon)


class ReportError(ValueError):
    """A run's results cannot be read or reported; the message is one line naming the path."""


def load_run(out_dir: str) -> RunMetrics:
    """Read ``out_dir/metrics.h5`` (or that file itself); a bad file raises :class:`ReportError`."""
    try:
        return metrics.read(out_dir)
    except hdf5.OutputError as e:
        raise ReportError(str(e)) from None


def default_label(run: RunMetrics) -> str:
    """``nu=<train.nu> <train.metagrad>`` from the run's config, ``FedAvg (nu=0)`` for ν = 0 (no
    fine-tuning step, so no meta-gradient flavour), the algorithm's name for the others (with a
    server optimizer other than sgd); the directory name if absent."""
    train, algo, server = (run.config.get(k) for k in ("train", "algorithm", "server"))
    opt = f" + {server['optimizer']}" if isinstance(server, dict) and server.get("optimizer", "sgd") != "sgd" else ""
    privacy = run.config.get("privacy")
    if isinstance(privacy, dict) and privacy.get("clip") is not None:
        eps = run.train.get("epsilon", np.zeros(0))
        opt += f" (DP, ε={eps[-1]:.3g})" if eps.size else " (DP)"
    if isinstance(algo, dict) and algo.get("name", "meta") != "meta":
        return f"{fmt_value(algo['name'])}{opt}"
    return f"{default_label_meta(run)}{opt}"


def default_label_meta(run: RunMetrics) -> str:
    train = run.config.get("train")
    parts = []
    if isinstance(train, dict):
        if train.get("nu") == 0:
            return "FedAvg (nu=0)"
        if "nu" in train:
            parts.append(f"nu={fmt_value(train['nu'])}")
        if train.get("metagrad") not in (None, ""):
            parts.append(fmt_value(train["metagrad"]))
    return " ".join(parts) or run.name


def _resolve_labels(runs: list[RunMetrics], labels: list[str] | None) -> list[str]:
    if labels is None:
        out = [default_label(r) for r in runs]
    else:
        labels = list(labels)
        if len(labels) != len(runs):
            raise ReportError(f"got {len(labels)} label(s) for {len(runs)} run(s)")
        out = [str(lab) for lab in labels]
    dup = {lab for lab in out if out.count(lab) > 1}
    out = [f"{lab} ({r.name})" if lab in dup else lab for lab, r in zip(out, runs)]
    dup = {lab for lab in out if out.count(lab) > 1}
    if dup:  # same directory name under different parents
        out = [f"{lab} #{i + 1}" if lab in dup else lab for i, lab in enumerate(out)]
    return out


def _draw(runs: list[RunMetrics], labels: list[str], ks: list[int], dest: str, sharey: bool) -> list[str]:
    """Every image into ``dest``; returns their file names."""
    colors = plots.run_colors(len(runs))
    acc, loss, dist, meta = REPORT_FILES[:4]
    plots.curves_plot(runs, labels, colors, ks, "acc", os.path.join(dest, acc), sharey)
    plots.curves_plot(runs, labels, colors, ks, "loss", os.path.join(dest, loss), sharey)
    plots.distribution_plot(runs, labels, colors, ks, os.path.join(dest, dist))
    plots.train_loss_plot(runs, labels, colors, os.path.join(dest, meta))
    images = [acc, loss, dist, meta]
    if any(r.has_personal for r in runs):
        plots.personal_plot(runs, labels, colors, os.path.join(dest, PERSONAL_FILE))
        images.append(PERSONAL_FILE)
    if any(np.isfinite(r.train.get("epsilon", np.zeros(0))).any() for r in runs):
        plots.privacy_plot(runs, labels, colors, ks, os.path.join(dest, PRIVACY_FILE))
        images.append(PRIVACY_FILE)
    if any(np.isfinite(r.grad_norm_sq).any() for r in runs):
        plots.stationarity_plot(runs, labels, colors, os.path.join(dest, STATIONARITY_FILE))
        images.append(STATIONARITY_FILE)
    return images


def make_report(out_dirs: list[str], dest: str, labels: list[str] | None = None, sharey: bool = False) -> list[str]:
    """Write ``accuracy.png``, ``loss.png``, ``distribution.png``, ``train_loss.png`` (and
    ``personal.png``, ``stationarity.png`` where runs have them) and ``summary.md`` for the runs in ``out_dirs`` into ``dest`` (created). Returns the written paths.

    ``labels`` (one per run) replaces the default labels (``nu=<nu> <metagrad>``);
    colliding labels get the run's directory name appended. ``sharey``: one y-axis for every k in
    the accuracy and loss curves (to compare k's at a glance).
    """
    if isinstance(out_dirs, (str, os.PathLike)):
        out_dirs = [out_dirs]
    out_dirs = [os.fspath(d) for d in out_dirs]
    if not out_dirs:
        raise ReportError("no runs given")
    runs = [load_run(d) for d in out_dirs]
    labels = _resolve_labels(runs, labels)
    ks = sorted({int(k) for r in runs for k in r.finetune_steps})
    dest = os.fspath(dest)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{dest}: cannot create output directory ({' '.join(str(e).split())})") from None
    images = _draw(runs, labels, ks, dest, sharey)
    text = summary(runs, labels, ks, images)
    groups = experiment_groups(runs)
    if any(len(members) > 1 for _, members in groups):
        text = text.replace("\n## Runs\n", "\n" + seed_table(groups, ks) + "\n## Runs\n", 1)
    summary_path = os.path.join(dest, REPORT_FILES[4])
    files.atomic_write_bytes(summary_path, lambda fh: fh.write(text.encode("utf-8")))
    return [os.path.join(dest, name) for name in images] + [summary_path]
