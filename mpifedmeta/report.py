"""Plots and a Markdown summary from one or more runs' ``OUT/metrics.h5`` files.

The layout read here is documented in ``docs/hdf5-layout.md``. Files are opened
read-only with h5py; nothing is ever unpickled. Matplotlib is imported lazily
inside :func:`make_report` (and only its object-oriented API with the Agg
canvas is used, so no global backend or pyplot state is touched), which keeps
``import mpifedmeta.report`` free of matplotlib.

Accuracies are stored as fractions in [0, 1]; plots and the summary show them
as percentages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import keys_where

__all__ = ["ReportError", "RunMetrics", "load_run", "make_report", "default_label", "REPORT_FILES"]

METRICS_FILE = "metrics.h5"
METRICS_FORMAT = "mpifedmeta.metrics"
#: File names written by :func:`make_report`, in order.
REPORT_FILES = ("accuracy.png", "loss.png", "distribution.png", "train_meta_loss.png", "summary.md")
STATIONARITY_FILE = "stationarity.png"   # written only when some run tracked ‖∇F(w)‖² (eval.stationarity)
# Config keys that do not define an experiment (seeds are aggregated over, the rest is bookkeeping).
_NOT_EXPERIMENT = keys_where("experiment", False)

_DASH = "\u2013"  # shown for missing values (no holdout agents, k not evaluated, ...)


class ReportError(ValueError):
    """A run's results cannot be read or reported; the message is one line naming the path."""


@dataclass
class RunMetrics:
    """What the report needs from one run's ``metrics.h5``.

    ``R`` evaluation rows, ``K`` fine-tuning step counts, ``A`` evaluated training
    agents, ``H`` holdout agents (possibly 0). Per-agent arrays are only kept for
    the last evaluation row (that is all the report uses, and the full
    ``(R, K, A)`` arrays can be large).
    """

    out_dir: str
    path: str
    config: dict
    finetune_steps: np.ndarray  # (K,) int64
    eval_round: np.ndarray  # (R,) int64
    train_loss_mean: np.ndarray  # (R, K) float64
    train_acc_mean: np.ndarray  # (R, K)
    holdout_loss_mean: np.ndarray  # (R, K), NaN when H == 0
    holdout_acc_mean: np.ndarray  # (R, K)
    final_train_agent_loss: np.ndarray  # (K, A) at eval_round[-1]; (K, 0) when R == 0
    final_train_agent_acc: np.ndarray  # (K, A)
    final_holdout_agent_loss: np.ndarray  # (K, H)
    final_holdout_agent_acc: np.ndarray  # (K, H)
    train_agent_ids: np.ndarray  # (A,) int64
    holdout_agent_ids: np.ndarray  # (H,) int64
    train: dict[str, np.ndarray]  # 1-D arrays of the `train` group: round, meta_loss, wall_time, ...
    attrs: dict[str, Any] = field(default_factory=dict)  # other file attributes (strategy, versions, ...)
    grad_norm_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) ‖∇F(w)‖², NaN when not tracked
    meta_loss_full: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) F(w) on full local data

    @property
    def name(self) -> str:
        """The output directory's name."""
        return os.path.basename(os.path.normpath(self.out_dir)) or self.out_dir

    @property
    def num_holdout(self) -> int:
        return int(self.final_holdout_agent_acc.shape[1])

    @property
    def has_holdout(self) -> bool:
        return self.num_holdout > 0 or bool(np.isfinite(self.holdout_acc_mean).any())

    @property
    def final_eval_round(self) -> int | None:
        return int(self.eval_round[-1]) if self.eval_round.size else None

    @property
    def rounds(self) -> int:
        """Last completed training round (0 if none)."""
        r = self.train.get("round")
        if r is not None and r.size:
            return int(r[-1])
        return int(self.eval_round.max()) if self.eval_round.size else 0

    @property
    def wall_time(self) -> float:
        """Training wall time in seconds at the last completed round (NaN if none)."""
        w = self.train.get("wall_time")
        return float(w[-1]) if w is not None and w.size else float("nan")

    def k_index(self, k: int) -> int | None:
        hits = np.flatnonzero(self.finetune_steps == k)
        return int(hits[0]) if hits.size else None


# --------------------------------------------------------------------------- loading


def _metrics_path(out_dir: str) -> str:
    if os.path.isfile(out_dir) and out_dir.endswith((".h5", ".hdf5")):
        return out_dir
    return os.path.join(out_dir, METRICS_FILE)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _attr_str(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value[()])
    return str(value)


def _plain_attr(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_, str)):
        return _attr_str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_run(out_dir: str) -> RunMetrics:
    """Read ``out_dir/metrics.h5`` (read-only) into a :class:`RunMetrics`.

    ``out_dir`` may also be the path of the ``.h5`` file itself. Raises
    :class:`ReportError` (message naming the file) for a missing, truncated,
    non-HDF5 or foreign file, or one that does not follow the layout.
    """
    import h5py

    path = _metrics_path(out_dir)
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file (is {out_dir!r} an mpifedmeta output directory?)")
    try:
        try:
            f = h5py.File(path, "r", locking=False)
        except TypeError:  # h5py < 3.5 has no `locking`
            f = h5py.File(path, "r")
    except OSError as e:
        raise ReportError(f"{path}: not a readable HDF5 file ({_one_line(e)})") from None

    def bad(msg: str) -> ReportError:
        return ReportError(f"{path}: {msg}")

    try:
        with f:
            fmt = f.attrs.get("format")
            if fmt is None or _attr_str(fmt) != METRICS_FORMAT:
                raise bad("not an mpifedmeta metrics file" + ("" if fmt is None else f" (format={_attr_str(fmt)!r})"))
            if "config" not in f.attrs:
                raise bad("missing attribute 'config'")
            try:
                config = json.loads(_attr_str(f.attrs["config"]))
            except ValueError as e:
                raise bad(f"attribute 'config' is not valid JSON ({_one_line(e)})") from None
            if not isinstance(config, dict):
                raise bad("attribute 'config' is not a JSON object")
            attrs = {k: _plain_attr(v) for k, v in f.attrs.items() if k not in ("format", "config")}

            for g in ("train", "eval"):
                if g not in f or not isinstance(f[g], h5py.Group):
                    raise bad(f"missing group '{g}'")
            ev, tr = f["eval"], f["train"]

            def read(group, name, required=True):
                if name not in group:
                    if required:
                        raise bad(f"missing dataset '{group.name.strip('/')}/{name}'")
                    return None
                obj = group[name]
                if not isinstance(obj, h5py.Dataset):
                    raise bad(f"'{obj.name.strip('/')}' is not a dataset")
                return obj

            # train group: 1-D datasets of equal length
            train: dict[str, np.ndarray] = {}
            for name, obj in tr.items():
                if isinstance(obj, h5py.Dataset) and obj.ndim == 1:
                    train[name] = obj[:]
            for name in ("round", "meta_loss", "wall_time"):
                if name not in train:
                    raise bad(f"missing dataset 'train/{name}'")
            lengths = {len(v) for v in train.values()}
            if len(lengths) != 1:
                raise bad(f"datasets of group 'train' have different lengths {sorted(lengths)}")

            # eval group
            if "finetune_steps" not in ev.attrs:
                raise bad("missing attribute 'eval.finetune_steps'")
            ks = np.atleast_1d(np.asarray(ev.attrs["finetune_steps"])).astype(np.int64)
            K = ks.size
            rounds = read(ev, "round")[:].astype(np.int64)
            if rounds.ndim != 1:
                raise bad("'eval/round' is not 1-D")
            R = rounds.size

            extra_scalars: dict[str, np.ndarray] = {}
            means = {}
            for name in ("train_loss_mean", "train_acc_mean", "holdout_loss_mean", "holdout_acc_mean"):
                d = read(ev, name, required=name.startswith("train"))
                arr = np.full((R, K), np.nan) if d is None else np.asarray(d[:], dtype=np.float64)
                if arr.shape != (R, K):
                    raise bad(f"'eval/{name}' has shape {arr.shape}, expected {(R, K)}")
                means[name] = arr

            def ids(name):
                d = read(ev, name, required=name.startswith("train"))
                return np.zeros(0, np.int64) if d is None else d[:].astype(np.int64).reshape(-1)

            train_ids, holdout_ids = ids("train_agent_ids"), ids("holdout_agent_ids")

            def last_row(name, n):
                d = read(ev, name, required=name.startswith("train"))
                if d is None:
                    return np.zeros((K, n), np.float64)
                if d.ndim != 3 or d.shape[0] != R or d.shape[1] != K:
                    raise bad(f"'eval/{name}' has shape {d.shape}, expected {(R, K, n)}")
                if R == 0:
                    return np.zeros((K, d.shape[2]), np.float64)
                return np.asarray(d[R - 1], dtype=np.float64)

            for name in ("grad_norm_sq", "meta_loss_full"):
                d = read(ev, name, required=False)
                extra_scalars[name] = np.full(R, np.nan) if d is None else np.asarray(d[:], dtype=np.float64)

            finals = {
                "final_train_agent_loss": last_row("train_agent_loss", train_ids.size),
                "final_train_agent_acc": last_row("train_agent_acc", train_ids.size),
                "final_holdout_agent_loss": last_row("holdout_agent_loss", holdout_ids.size),
                "final_holdout_agent_acc": last_row("holdout_agent_acc", holdout_ids.size),
            }
    except ReportError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # truncated / corrupt contents
        raise bad(f"cannot read ({_one_line(e)})") from None

    return RunMetrics(
        out_dir=out_dir,
        path=path,
        config=config,
        finetune_steps=ks,
        eval_round=rounds,
        train_loss_mean=means["train_loss_mean"],
        train_acc_mean=means["train_acc_mean"],
        holdout_loss_mean=means["holdout_loss_mean"],
        holdout_acc_mean=means["holdout_acc_mean"],
        train_agent_ids=train_ids,
        holdout_agent_ids=holdout_ids,
        train=train,
        attrs=attrs,
        **extra_scalars,
        **finals,
    )


# --------------------------------------------------------------------------- labels


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def default_label(run: RunMetrics) -> str:
    """``nu=<train.nu> <train.metagrad>`` from the run's config (the directory name if absent)."""
    train = run.config.get("train")
    parts = []
    if isinstance(train, dict):
        if "nu" in train:
            parts.append(f"nu={_fmt_value(train['nu'])}")
        if train.get("metagrad") not in (None, ""):
            parts.append(_fmt_value(train["metagrad"]))
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


# --------------------------------------------------------------------------- plotting


def _new_figure(nplots: int, width: float = 4.8, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(nplots, 3))
    nrows = max(1, math.ceil(nplots / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, list(axes[: max(nplots, 1)])


def _atomic_write(path: str, write) -> None:
    """Write ``path`` atomically: a temporary file in the same directory, then a rename."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(fig, path: str) -> None:
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))


def _write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(fig, axes, runs_handles: list, style_handles: list) -> None:
    handles = runs_handles + style_handles
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=min(len(handles), 4),
            frameon=False,
            fontsize="small",
        )


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _round_axis(ax, xs: list) -> None:
    """Integer round ticks; a single evaluated round gets one tick instead of fractional ones."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    x = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in xs]) if xs else np.zeros(0)
    if x.size and x.max() - x.min() < 1:
        ax.set_xlim(x.min() - 1, x.max() + 1)
        ax.set_xticks([x.min()])


def _curves_plot(runs, labels, colors, ks, what: str, path: str) -> None:
    from matplotlib.lines import Line2D

    scale = 100.0 if what == "acc" else 1.0
    ylabel = "personalized test accuracy (%)" if what == "acc" else "personalized test loss"
    fig, axes = _new_figure(len(ks))
    any_holdout = False
    for ax, k in zip(axes, ks):
        drawn, xs = False, []
        for run, color in zip(runs, colors):
            j = run.k_index(k)
            if j is None or run.eval_round.size == 0:
                continue
            xs.append(run.eval_round)
            marker = "o" if run.eval_round.size <= 40 else None
            x = run.eval_round
            y = getattr(run, f"train_{what}_mean")[:, j] * scale
            if np.isfinite(y).any():
                ax.plot(x, y, color=color, ls="-", marker=marker, ms=3)
                drawn = True
            yh = getattr(run, f"holdout_{what}_mean")[:, j] * scale
            if np.isfinite(yh).any():
                ax.plot(x, yh, color=color, ls="--", marker=marker, ms=3, mfc="none")
                drawn = any_holdout = True
        ax.set_title(f"k = {k} fine-tuning steps")
        _round_axis(ax, xs)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if not drawn:
            _no_data(ax)
    run_handles = [Line2D([], [], color=c, lw=2, label=lab) for lab, c in zip(labels, colors)]
    style = [Line2D([], [], color="k", ls="-", label="training agents")]
    if any_holdout:
        style.append(Line2D([], [], color="k", ls="--", label="holdout agents"))
    _legend(fig, axes, run_handles, style)
    _save(fig, path)


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _distribution_plot(runs, labels, colors, ks, path: str) -> None:
    from matplotlib.patches import Patch

    fig, axes = _new_figure(len(ks), width=max(4.8, 1.1 * len(runs) + 1.5))
    ticks = [lab if r.final_eval_round is None else f"{lab}\n(round {r.final_eval_round})" for lab, r in zip(labels, runs)]
    any_holdout = False
    for ax, k in zip(axes, ks):
        drawn = False
        for i, (run, color) in enumerate(zip(runs, colors)):
            j = run.k_index(k)
            if j is None or run.eval_round.size == 0:
                continue
            if run.has_holdout:
                groups = [(_finite(run.final_train_agent_acc[j]) * 100, i - 0.2, False),
                          (_finite(run.final_holdout_agent_acc[j]) * 100, i + 0.2, True)]
            else:
                groups = [(_finite(run.final_train_agent_acc[j]) * 100, float(i), False)]
            for data, pos, holdout in groups:
                if data.size == 0:
                    continue
                bp = ax.boxplot(
                    [data], positions=[pos], widths=0.34, patch_artist=True, showmeans=True,
                    manage_ticks=False, flierprops={"markersize": 3, "alpha": 0.5},
                    meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "k", "markersize": 4},
                    medianprops={"color": "k"},
                )
                for box in bp["boxes"]:
                    box.set_facecolor(color)
                    box.set_alpha(0.45 if holdout else 0.85)
                    if holdout:
                        box.set_hatch("//")
                drawn = True
                any_holdout |= holdout
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(ticks, rotation=30 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center",
                           fontsize="small")
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_title(f"k = {k} fine-tuning steps")
        ax.set_ylabel("personalized test accuracy (%)")
        ax.grid(True, axis="y", alpha=0.3)
        if not drawn:
            _no_data(ax)
    fig.suptitle("accuracy over agents at the last evaluated round")
    style = [Patch(facecolor="0.5", alpha=0.85, label="training agents")]
    if any_holdout:
        style.append(Patch(facecolor="0.5", alpha=0.45, hatch="//", label="holdout agents"))
    _legend(fig, axes, [], style)
    _save(fig, path)


def _meta_loss_plot(runs, labels, colors, path: str) -> None:
    from matplotlib.lines import Line2D

    fig, (ax,) = _new_figure(1, width=6.4, height=4.0)
    drawn, xs = False, []
    for run, color in zip(runs, colors):
        r, m = run.train["round"], np.asarray(run.train["meta_loss"], dtype=np.float64)
        if r.size == 0 or not np.isfinite(m).any():
            continue
        xs.append(r)
        ax.plot(r, m, color=color, marker="o" if r.size <= 40 else None, ms=3)
        drawn = True
    ax.set_title("training meta-loss")
    _round_axis(ax, xs)
    ax.set_ylabel("train/meta_loss")
    ax.grid(True, alpha=0.3)
    if not drawn:
        _no_data(ax, "no training rounds")
    _legend(fig, [ax], [Line2D([], [], color=c, lw=2, label=lab) for lab, c in zip(labels, colors)], [])
    _save(fig, path)


# --------------------------------------------------------------------------- summary


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return _DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m {sec:02d}s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h {rem // 60:02d}m"


def _acc_cell(mean: float, per_agent: np.ndarray) -> str:
    if not math.isfinite(mean):
        return _DASH
    vals = _finite(per_agent)
    if vals.size == 0:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * float(np.std(vals)):.1f}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _summary(runs, labels, ks, images: list[str]) -> str:
    head = ["run", "rounds", "eval round"]
    for k in ks:
        head += [f"train acc k={k} (%)", f"holdout acc k={k} (%)"]
    head.append("wall time")
    lines = [
        "# mpifedmeta report",
        "",
        "Personalized test accuracy after k fine-tuning steps at each run's last evaluated round:",
        "mean over agents ± standard deviation over agents (training agents / holdout agents).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for run, label in zip(runs, labels):
        row = [_md_escape(label), str(run.rounds), _DASH if run.final_eval_round is None else str(run.final_eval_round)]
        for k in ks:
            j = run.k_index(k)
            if j is None or run.eval_round.size == 0:
                row += [_DASH, _DASH]
                continue
            row.append(_acc_cell(float(run.train_acc_mean[-1, j]), run.final_train_agent_acc[j]))
            row.append(_acc_cell(float(run.holdout_acc_mean[-1, j]), run.final_holdout_agent_acc[j]))
        row.append(_fmt_duration(run.wall_time))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", ""]
    for run, label in zip(runs, labels):
        extra = []
        if "strategy" in run.attrs:
            extra.append(f"strategy `{run.attrs['strategy']}`")
        if "num_params" in run.attrs:
            extra.append(f"{run.attrs['num_params']} parameters")
        extra.append(f"{run.train_agent_ids.size} training agents evaluated, {run.num_holdout} holdout agents")
        lines.append(f"- **{_md_escape(label)}**: `{run.path}` ({', '.join(extra)})")
    lines += ["", "## Plots", ""]
    for name in images:
        lines += [f"![{os.path.splitext(name)[0]}]({name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def make_report(out_dirs: list[str], dest: str, labels: list[str] | None = None) -> list[str]:
    """Write ``accuracy.png``, ``loss.png``, ``distribution.png``, ``train_meta_loss.png`` and
    ``summary.md`` for the runs in ``out_dirs`` into ``dest`` (created). Returns the written paths.

    ``labels`` (one per run) replaces the default labels (``nu=<nu> <metagrad>``);
    colliding labels get the run's directory name appended.
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
        raise ReportError(f"{dest}: cannot create output directory ({_one_line(e)})") from None

    colors = _colors(len(runs))
    acc, loss, dist, meta, summary = (os.path.join(dest, n) for n in REPORT_FILES)
    _curves_plot(runs, labels, colors, ks, "acc", acc)
    _curves_plot(runs, labels, colors, ks, "loss", loss)
    _distribution_plot(runs, labels, colors, ks, dist)
    _meta_loss_plot(runs, labels, colors, meta)
    images = list(REPORT_FILES[:4])
    written = [acc, loss, dist, meta]
    if any(np.isfinite(r.grad_norm_sq).any() for r in runs):
        path = os.path.join(dest, STATIONARITY_FILE)
        _stationarity_plot(runs, labels, colors, path)
        images.append(STATIONARITY_FILE)
        written.append(path)
    text = _summary(runs, labels, ks, images)
    groups = experiment_groups(runs)
    if any(len(members) > 1 for _, members in groups):
        text = text.replace("\n## Runs\n", "\n" + _seed_table(groups, ks) + "\n## Runs\n", 1)
    _write_text(summary, text)
    return written + [summary]


# --------------------------------------------------------------------------- seeds and theory


def _experiment_key(config: dict) -> str:
    reduced = {sec: {k: v for k, v in vals.items() if k not in _NOT_EXPERIMENT.get(sec, ())}
               for sec, vals in config.items() if isinstance(vals, dict)}
    return json.dumps(reduced, sort_keys=True)


def experiment_groups(runs: list[RunMetrics]) -> list[tuple[str, list[RunMetrics]]]:
    """Runs grouped by configuration apart from the seed; each group labelled by the keys that
    differ between groups (e.g. ``nu=3 metagrad=hf``). Order of first appearance."""
    order: dict[str, list[RunMetrics]] = {}
    for r in runs:
        order.setdefault(_experiment_key(r.config), []).append(r)
    configs = [json.loads(k) for k in order]
    varying = []
    for sec in sorted({s for c in configs for s in c}):
        for k in sorted({k for c in configs for k in c.get(sec, {})}):
            if len({json.dumps(c.get(sec, {}).get(k)) for c in configs}) > 1:
                varying.append((sec, k))
    out = []
    for key, members in order.items():
        c = json.loads(key)
        label = " ".join(f"{k}={_fmt_value(c.get(sec, {}).get(k))}" for sec, k in varying) or "all runs"
        out.append((label, members))
    return out


def _mean_std(values: list[float]) -> str:
    v = np.array([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return _DASH
    return f"{100 * v.mean():.1f} ± {100 * v.std():.1f}" if v.size > 1 else f"{100 * v[0]:.1f}"


def _seed_table(groups, ks) -> str:
    """Final personalized accuracy per experiment: mean ± std over seeds of the agents' mean."""
    head = ["experiment", "seeds"] + [f"train k={k}" for k in ks] + [f"holdout k={k}" for k in ks] + ["s/round"]
    lines = ["## Aggregated over seeds", "",
             "Personalized test accuracy (%) at the last evaluated round after k fine-tuning steps: mean ± std over "
             "seeds of the mean over agents; s/round = median training time per round, mean over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, members in groups:
        row = [_md_escape(label), str(len(members))]
        for what in ("train_acc_mean", "holdout_acc_mean"):
            for k in ks:
                vals = []
                for r in members:
                    j = r.k_index(k)
                    if j is not None and r.eval_round.size:
                        vals.append(float(getattr(r, what)[-1, j]))
                row.append(_mean_std(vals))
        times = [float(np.median(r.train["round_time"])) for r in members
                 if "round_time" in r.train and r.train["round_time"].size]
        row.append(f"{np.mean(times):.3f}" if times else _DASH)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _stationarity_plot(runs, labels, colors, path: str) -> None:
    """‖∇F(w)‖² and F(w) (full local data, exact meta-gradient) over rounds, log scale."""
    fig, axes = _new_figure(2)
    for run, label, color in zip(runs, labels, colors):
        ok = np.isfinite(run.grad_norm_sq)
        if ok.any():
            axes[0].semilogy(run.eval_round[ok], np.maximum(run.grad_norm_sq[ok], 1e-300), color=color, label=label)
            axes[1].plot(run.eval_round[ok], run.meta_loss_full[ok], color=color, label=label)
    axes[0].set_title("stationarity ‖∇F(w)‖²")
    axes[1].set_title("meta-loss F(w)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)
