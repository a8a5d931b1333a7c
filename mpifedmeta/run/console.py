"""What rank 0 shows on the terminal: progress of the rounds and the final accuracy table."""

from __future__ import annotations

import sys


def say(world, *args, err: bool = False) -> None:
    """Print on rank 0 only (to stderr with ``err``), flushed at once."""
    if world.is_root:
        print(*args, file=sys.stderr if err else sys.stdout, flush=True)


class Progress:
    """A tqdm bar on an interactive terminal; plain periodic lines in batch jobs (rank 0 only)."""

    def __init__(self, world, start: int, total: int, every: int):
        self.bar, self.lines = None, world.is_root
        self.every = every or max(1, (total - start) // 20)
        if world.is_root and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar, self.lines = tqdm(total=total, initial=start, unit="round", dynamic_ncols=True), False

    def update(self, round_: int, total: int, loss: float, round_time: float, eval_row: dict | None = None,
               epsilon: float | None = None) -> None:
        """One finished round; ``eval_row`` (rank 0, rounds that evaluated) adds the accuracies,
        ``epsilon`` (differential privacy) the privacy spent so far."""
        acc = accuracy_text(eval_row) + (f"  eps {epsilon:.3g}" if epsilon is not None else "")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f}{acc}")
        elif self.lines and (round_ % self.every == 0 or round_ == total):
            print(f"round {round_}/{total}  loss {loss:.4f}  {round_time:.3f} s/round{acc}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def accuracy_text(eval_row: dict | None) -> str:
    """"  acc@k 12.3 45.6 …" (mean personalized accuracy of the training agents), or "" without a row."""
    if eval_row is None:
        return ""
    personal = f"  personal {100 * eval_row['personal_acc_mean']:.1f}" if "personal_acc_mean" in eval_row else ""
    return "  acc@k " + " ".join(f"{100 * a:.1f}" for a in eval_row["train_acc_mean"]) + personal


def final_table(ks: list[int], row: dict) -> str:
    """Accuracy after k fine-tuning steps, mean ± std over the training and the holdout agents."""
    lines = ["personalized test accuracy after k fine-tuning steps (mean ± std over agents)",
             f"{'k':>3}  {'training agents':>18}  {'holdout agents':>18}"]
    for j, k in enumerate(ks):
        cells = []
        for name in ("train", "holdout"):
            a = row[f"{name}_agent_acc"][j]
            cells.append(f"{100 * a.mean():6.2f}% ± {100 * a.std():5.2f}" if a.size else f"{'–':>18}")
        lines.append(f"{k:>3}  {cells[0]:>18}  {cells[1]:>18}")
    if "personal_agent_acc" in row:
        cells = [_cell(row[f"{name}_agent_acc"]) for name in ("personal", "holdout_personal")]
        lines.append(f"{'own':>3}  {cells[0]:>18}  {cells[1]:>18}   (the algorithm's personalized model)")
    return "\n".join(lines)


def _cell(a) -> str:
    return f"{100 * a.mean():6.2f}% ± {100 * a.std():5.2f}" if a.size else f"{'–':>18}"
