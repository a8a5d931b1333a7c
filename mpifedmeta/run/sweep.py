"""Parameter sweeps: the cartesian product of ``--grid section.key=v1,v2,...`` over a base config,
one output directory per point, run one after another (each on all ranks) or one point per SLURM
array task (``--task I``). Finished points are skipped and interrupted ones resumed.
"""

from __future__ import annotations

import itertools
import os

from mpifedmeta.run.config import ConfigError, apply_overrides, parse_value


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["train.nu=0,1,3", ...]`` → [("train.nu", ["0", "1", "3"]), ...] (values kept as text)."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected section.key=v1,v2,...")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in _split_top_level(values) if v.strip()]
        if not vals:
            raise ConfigError(f"--grid {item!r}: no values")
        apply_overrides({}, [f"{key.strip()}={vals[0]}"])   # validates the key name
        grid.append((key.strip(), vals))
    return grid


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] (so list values like [80,60] survive)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination as a list of ``key=value`` overrides, in a fixed order."""
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(vals for _, vals in grid))]


def point_name(overrides: list[str]) -> str:
    """Directory name of a point, e.g. ``nu=1_metagrad=exact_seed=0``."""
    parts = []
    for o in overrides:
        key, value = o.split("=", 1)
        v = parse_value(value)
        text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        parts.append(f"{key.split('.')[-1]}={text}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


def plan(out: str, grid_items: list[str]) -> list[tuple[str, list[str]]]:
    """(output dir, overrides) of every point of the sweep."""
    return [(os.path.join(out, point_name(p)), p) for p in points(parse_grid(grid_items))]
