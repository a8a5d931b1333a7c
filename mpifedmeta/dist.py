"""Everything MPI: the world, the agent blocks, device choice, collectives, and aborting the whole
job when one rank fails. The only module that imports mpi4py.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch


class LaunchError(RuntimeError):
    """The job was started in a way that cannot work (e.g. srun without an MPI plugin)."""


@dataclass
class World:
    comm: object            # mpi4py.MPI.Comm
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _mpi():
    from mpi4py import MPI
    return MPI


def init_world() -> World:
    """Initialise MPI (if needed) and describe this process's place in the job."""
    MPI = _mpi()
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    world = World(comm, comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size())
    local.Free()
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if world.size == 1 and step_tasks > 1:
        raise LaunchError(
            f"this srun step has {step_tasks} tasks but MPI sees a world of size 1: each task is an "
            "independent copy. Launch with `srun --mpi=pmi2 ...` (PyPI mpich wheel) or with `mpiexec` "
            "inside the allocation")
    return world


def mpi4py_version() -> str:
    import mpi4py
    return mpi4py.__version__


def mpi_library() -> str:
    MPI = _mpi()
    return " ".join(MPI.Get_library_version().split())[:200]


def install_abort_handler(world: World) -> None:
    """Make an uncaught exception on any rank end the whole job at once (never a hang).

    Plain ``mpiexec -n 2 python ...`` hangs when one rank dies while the others wait in a
    collective; we print the error once, tagged with the rank, and call MPI Abort.
    """

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        message = f"[rank {world.rank}] {text}mpifedmeta: error on rank {world.rank}: {exc_type.__name__}: {exc}\n"
        try:
            sys.stdout.flush()
            os.write(2, message.encode(errors="replace"))
        except OSError:
            pass
        if world.size > 1:
            time.sleep(1.0)       # let the launcher forward this message before Abort tears the job down
            world.comm.Abort(1)
        os._exit(1)

    sys.excepthook = hook


def abort(world: World, code: int) -> None:
    """End every rank with ``code`` (the caller already printed why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if world.size > 1:
        world.comm.Abort(code)
    raise SystemExit(code)


def block_range(num_agents: int, size: int, rank: int) -> tuple[int, int]:
    """The contiguous agent ids [lo, hi) owned by ``rank``; block sizes differ by at most one."""
    return num_agents * rank // size, num_agents * (rank + 1) // size


def choose_device(world: World, preference: str = "auto", threads: int = 0) -> torch.device:
    """This rank's device: GPU ``local_rank % visible GPUs`` when CUDA is usable, else the CPU with
    torch threads set so that the node's ranks do not oversubscribe its cores."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if preference == "cuda":
        raise LaunchError("train.device = 'cuda' but torch sees no usable GPU on this rank")
    torch.set_num_threads(threads if threads > 0 else cpu_threads_per_rank(world))
    return torch.device("cpu")


def cpu_threads_per_rank(world: World) -> int:
    """OMP_NUM_THREADS when the user set it, else the rank's share of the cores it may run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bound = available < (os.cpu_count() or available)   # the launcher pinned this rank to its own cores
    return max(1, available if bound else available // world.local_size)


def cuda_aware() -> bool:
    """True when the MPI library reports CUDA support (then GPU buffers could go to MPI directly)."""
    MPI = _mpi()
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query else False
    except Exception:
        return False


def allreduce_sum(world: World, buffer: np.ndarray) -> np.ndarray:
    """In-place SUM Allreduce of a contiguous numpy buffer (int64 buffers sum exactly)."""
    if world.size > 1:
        world.comm.Allreduce(_mpi().IN_PLACE, buffer, op=_mpi().SUM)
    return buffer


def allreduce_tensor(world: World, buffer: torch.Tensor) -> np.ndarray:
    """SUM Allreduce of a contiguous tensor; returns the result as a host numpy array.

    A GPU buffer goes to MPI directly when the MPI library is CUDA-aware, else it is staged
    through host memory (the default with the PyPI mpich wheel).
    """
    if world.size > 1 and buffer.is_cuda and cuda_aware():
        buffer = buffer.contiguous()
        torch.cuda.current_stream(buffer.device).synchronize()
        world.comm.Allreduce(_mpi().IN_PLACE, buffer, op=_mpi().SUM)
        return buffer.cpu().numpy()
    host = np.ascontiguousarray(buffer.cpu().numpy())
    return allreduce_sum(world, host)


def max_min(world: World, value: float) -> tuple[float, float]:
    """The largest and the smallest of every rank's ``value`` (one 2-float MAX Allreduce)."""
    buf = np.array([value, -value], dtype=np.float64)
    if world.size > 1:
        world.comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().MAX)
    return float(buf[0]), float(-buf[1])


def allreduce_max_int(world: World, value: int) -> int:
    if world.size == 1:
        return value
    return int(world.comm.allreduce(int(value), op=_mpi().MAX))


def gather_rows(world: World, rows: np.ndarray) -> np.ndarray | None:
    """Concatenate every rank's rows (rank order) on rank 0 with one Gatherv; None elsewhere."""
    rows = np.ascontiguousarray(rows)
    if world.size == 1:
        return rows
    MPI = _mpi()
    row_shape = rows.shape[1:]
    width = int(np.prod(row_shape)) if row_shape else 1
    counts = np.array(world.comm.gather(rows.shape[0], root=0) or [], dtype=np.int64)
    if world.is_root:
        out = np.empty((int(counts.sum()),) + row_shape, dtype=rows.dtype)
        sizes = counts * width
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        world.comm.Gatherv(rows, [out, sizes, displs, MPI._typedict[rows.dtype.char]], root=0)
        return out
    world.comm.Gatherv(rows, None, root=0)
    return None


def first_error(world: World, message: str | None) -> str | None:
    """Agree on failure: every rank learns the lowest-ranked error message (or None if all succeeded).

    Used around start-up steps that can fail on some ranks only (reading files, devices), so that
    the error is printed once and every rank exits cleanly with the same code.
    """
    if world.size == 1:
        return message
    messages = world.comm.allgather(message)
    for rank, m in enumerate(messages):
        if m is not None:
            return m if rank == 0 or m.startswith("[rank") else f"[rank {rank}] {m}"
    return None


def allgather(world: World, obj) -> list:
    """Small Python objects from every rank (start-up only, never on the hot path)."""
    return [obj] if world.size == 1 else world.comm.allgather(obj)


def broadcast(world: World, obj):
    return obj if world.size == 1 else world.comm.bcast(obj, root=0)


def barrier(world: World) -> None:
    if world.size > 1:
        world.comm.Barrier()
