"""Command line: ``mpifedmeta run | resume | report | info | config``.

Exit codes: 0 done, 1 unexpected error (whole job aborted), 2 bad input (config, files, flags, an
output directory in use), 3 stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (resumable),
4 diverged, 5 disk full (or quota exceeded) while writing an output file.
"""

from __future__ import annotations

import argparse
import os
import sys

from mpifedmeta import __version__

EXIT_CODES_HELP = ("exit codes: 0 done, 1 unexpected error, 2 bad input, "
                   "3 stopped by a signal after a checkpoint (resume it), 4 diverged (NaN/Inf), "
                   "5 disk full while writing")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpifedmeta", description="Generalized (nu-step) meta federated learning "
                                "simulator. Launch with `mpiexec -n P mpifedmeta run CONFIG` for P ranks.",
                                epilog=EXIT_CODES_HELP)
    p.add_argument("--version", action="version", version=f"mpifedmeta {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train from a TOML config", epilog=EXIT_CODES_HELP)
    r.add_argument("config", help="TOML file (see `mpifedmeta config` for every key)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.nu=3 (repeatable)")
    r.add_argument("--auto-resume", action="store_true",
                   help="if output.dir already holds this run, resume it (for requeued batch jobs)")
    s = sub.add_parser("resume", help="continue a run from its latest checkpoint", epilog=EXIT_CODES_HELP)
    s.add_argument("out", help="the run's output directory")
    s.add_argument("--rounds", type=int, default=None, help="train until this many rounds in total")
    sw = sub.add_parser("sweep", help="run a grid of configs (one output directory per point)", epilog=EXIT_CODES_HELP)
    sw.add_argument("config", help="base TOML config")
    sw.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                    help="values to sweep (repeatable; the cartesian product is run)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override applied to every point")
    sw.add_argument("--out", required=True, help="parent directory; each point writes OUT/<point name>")
    sw.add_argument("--task", type=int, default=None, help="run only point number TASK (0-based; for SLURM arrays)")
    sw.add_argument("--list", action="store_true", help="print the points and exit")
    rep = sub.add_parser("report", help="plots and a Markdown summary of one or more runs")
    rep.add_argument("outs", nargs="+", help="output directories of runs (overlaid in the plots)")
    rep.add_argument("--out", dest="dest", default=None, help="where to write (default: OUT/report for one run, ./report otherwise)")
    rep.add_argument("--label", dest="labels", action="append", default=None, help="label per run, in order")
    rep.add_argument("--sharey", action="store_true", help="one y-axis for every k in the accuracy and loss curves")
    sub.add_parser("info", help="MPI library, ranks, devices, threads and versions (run it under mpiexec)")
    sub.add_parser("config", help="print every config key with its default and meaning")
    return p


def _on_every_rank(world, build):
    """Run ``build()`` on every rank; a ConfigError on any rank becomes the same message everywhere.

    Returns (value, None) or (None, message) so that the error is printed once and every rank exits 2.
    """
    from mpifedmeta.run import protocol
    from mpifedmeta.run.config import ConfigError

    try:
        return protocol.agreed(world, build, errors=(ConfigError,)), None
    except protocol.BadInput as e:
        return None, str(e)


def _fail(world, message: str, code: int = 2) -> int:
    if world is None or world.is_root:
        print(f"mpifedmeta: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """The program (console script ``mpifedmeta``); returns the exit code."""
    code = _main(argv)
    if argv is None:
        # The outcome is decided: Python's finalization restores the default handlers, so a second
        # stop signal arriving now would turn exit 3 into death by signal (143/130): ignore it.
        from mpifedmeta.run import signals
        signals.ignore()
    return code


def _main(argv: list[str] | None) -> int:
    from mpifedmeta.run import signals
    signals.install()                    # before torch/MPI load: a stop signal during start-up is kept, not fatal
    args = _parser().parse_args(argv)
    if args.command == "config":
        from mpifedmeta.run.config import describe
        print(describe())
        return 0
    if args.command == "report":
        return _report(args)

    from mpifedmeta.parallel import dist
    from mpifedmeta.run import protocol, runner, start
    from mpifedmeta.storage import files
    from mpifedmeta.run.config import load

    try:
        world = dist.init_world()
    except dist.LaunchError as e:
        return _fail(None, str(e))
    signals.install()                    # again right after MPI init: the mpich wheel installs its own USR1 handler there
    dist.install_abort_handler(world)
    if args.command == "info":
        from mpifedmeta.parallel.info import print_info
        return print_info(world)
    try:
        if args.command == "run":
            cfg, err = _on_every_rank(world, lambda: load(args.config, args.overrides))
            if err:
                return _fail(world, err)
            if args.auto_resume:
                return start.auto_resume_or_start(cfg, world)
            return start.start_new(cfg, world)
        if args.command == "sweep":
            return _sweep(args, world)
        if args.command == "resume":
            if args.rounds is not None and args.rounds < 0:
                return _fail(world, f"--rounds {args.rounds}: must be >= 0")
            return start.resume(args.out, world, args.rounds)
    except protocol.BadInput as e:
        return _fail(world, str(e))
    except files.DiskFull as e:            # every rank raises it (protocol.agreed): printed once, no rank left waiting
        return _fail(world, str(e), runner.EXIT_DISK_FULL)
    return 1


def _sweep(args, world) -> int:
    from mpifedmeta.run import runner, start, sweep
    from mpifedmeta.run.config import ConfigError, load

    def resolve():
        todo = sweep.plan(args.out, args.grid)
        if args.task is not None:
            if not 0 <= args.task < len(todo):
                raise ConfigError(f"--task {args.task}: the sweep has {len(todo)} points (0..{len(todo) - 1})")
            todo = [todo[args.task]]
        return todo, [load(args.config, args.overrides + p + [f"output.dir={json_str(d)}"]) for d, p in todo]

    resolved, err = _on_every_rank(world, resolve)
    if err:
        return _fail(world, err)
    todo, cfgs = resolved
    if args.list:
        if world.is_root:
            for i, (d, p) in enumerate(sweep.plan(args.out, args.grid)):
                print(f"{i:4d}  {d}  {' '.join(p)}")
        return 0
    diverged = []
    for n, ((d, _), cfg) in enumerate(zip(todo, cfgs), 1):
        if world.is_root:
            print(f"== sweep point {n}/{len(todo)}: {d}", flush=True)
        code = start.auto_resume_or_start(cfg, world)
        if code == runner.EXIT_DIVERGED:      # a result too (e.g. a step size above the stability bound)
            diverged.append(d)
        elif code != 0:
            return code
    if diverged and world.is_root:
        print(f"sweep: {len(diverged)} of {len(todo)} points diverged: {', '.join(diverged)}", flush=True)
    return runner.EXIT_DIVERGED if diverged else 0


def json_str(text: str) -> str:
    import json
    return json.dumps(text)


def _report(args) -> int:
    from mpifedmeta.report import ReportError, make_report
    dest = args.dest or (os.path.join(args.outs[0], "report") if len(args.outs) == 1 else "report")
    try:
        paths = make_report(args.outs, dest, args.labels, args.sharey)
    except ReportError as e:
        return _fail(None, str(e))
    for p in paths:
        print(p)
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
