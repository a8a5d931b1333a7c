"""The plots of the report (matplotlib, object-oriented API on an Agg canvas, imported lazily so
that importing the report needs no matplotlib and no global backend or pyplot state is touched).
"""

from __future__ import annotations

import math

import numpy as np

from mpifedmeta.storage import files
from .tables import finite


def _new_figure(nplots: int, width: float = 4.8, height: float = 3.6, sharey: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(nplots, 3))
    nrows = max(1, math.ceil(nplots / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, list(axes[: max(nplots, 1)])


def _save(fig, path: str) -> None:
    files.atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))


def run_colors(n: int) -> list:
    """One distinct colour per run."""
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


def curves_plot(runs, labels, colors, ks, what: str, path: str, sharey: bool = False) -> None:
    from matplotlib.lines import Line2D

    scale = 100.0 if what == "acc" else 1.0
    ylabel = "personalized test accuracy (%)" if what == "acc" else "personalized test loss"
    fig, axes = _new_figure(len(ks), sharey=sharey)
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


def distribution_plot(runs, labels, colors, ks, path: str) -> None:
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
                groups = [(finite(run.final_train_agent_acc[j]) * 100, i - 0.2, False),
                          (finite(run.final_holdout_agent_acc[j]) * 100, i + 0.2, True)]
            else:
                groups = [(finite(run.final_train_agent_acc[j]) * 100, float(i), False)]
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


def train_loss_plot(runs, labels, colors, path: str) -> None:
    """The algorithm's training loss (metrics.h5 train/train_loss; train/meta_loss in older files)."""
    from matplotlib.lines import Line2D

    fig, (ax,) = _new_figure(1, width=6.4, height=4.0)
    drawn, xs = False, []
    for run, color in zip(runs, colors):
        r, m = run.train["round"], np.asarray(run.train["train_loss"], dtype=np.float64)
        if r.size == 0 or not np.isfinite(m).any():
            continue
        xs.append(r)
        ax.plot(r, m, color=color, marker="o" if r.size <= 40 else None, ms=3)
        drawn = True
    ax.set_title("training loss (ν-family: the meta-loss f(θ^ν))")
    _round_axis(ax, xs)
    ax.set_ylabel("train/train_loss")
    ax.grid(True, alpha=0.3)
    if not drawn:
        _no_data(ax, "no training rounds")
    _legend(fig, [ax], [Line2D([], [], color=c, lw=2, label=lab) for lab, c in zip(labels, colors)], [])
    _save(fig, path)


def personal_plot(runs, labels, colors, path: str) -> None:
    """Test accuracy of the algorithms' own personalized models over rounds (training / holdout agents)."""
    fig, axes = _new_figure(2)
    for run, label, color in zip(runs, labels, colors):
        if not run.has_personal:
            continue
        axes[0].plot(run.eval_round, 100 * run.personal["personal_acc_mean"], color=color, label=label, marker="o", ms=3)
        axes[1].plot(run.eval_round, 100 * run.personal["holdout_personal_acc_mean"], color=color, label=label,
                     marker="o", ms=3)
    axes[0].set_title("personalized model: training agents")
    axes[1].set_title("personalized model: holdout agents")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def privacy_plot(runs, labels, colors, ks, path: str) -> None:
    """Test accuracy of the training agents after k fine-tuning steps against the ε spent (DP runs)."""
    fig, axes = _new_figure(len(ks))
    for run, label, color in zip(runs, labels, colors):
        eps = run.train.get("epsilon")
        if eps is None or not eps.size:
            continue
        at = {int(r): float(e) for r, e in zip(run.train["round"], eps)}
        rounds = [r for r in run.eval_round if int(r) in at]
        x = [at[int(r)] for r in rounds]
        rows = [int(np.flatnonzero(run.eval_round == r)[0]) for r in rounds]
        for ax, k in zip(axes, ks):
            j = run.k_index(k)
            if j is not None and rows:
                ax.plot(x, 100 * run.train_acc_mean[rows, j], color=color, label=label, marker="o", ms=3)
    for ax, k in zip(axes, ks):
        ax.set_title(f"k = {k}")
        ax.set_xlabel("ε spent (δ fixed)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("personalized accuracy of the training agents against the privacy spent")
    _save(fig, path)


def stationarity_plot(runs, labels, colors, path: str) -> None:
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
