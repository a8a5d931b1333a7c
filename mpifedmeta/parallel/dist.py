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

from mpifedmeta.parallel import devices


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
    """The MPI library: vendor and version, then the first line of its own version text, whole."""
    MPI = _mpi()
    vendor, version = MPI.get_vendor()
    first = next((line.strip() for line in MPI.Get_library_version().splitlines() if line.strip()), "")
    return f"{vendor} {'.'.join(map(str, version))} ({' '.join(first.split())})"


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


def choose_device(world: World, preference: str = "auto", threads: int = 0,
                  allow_tf32: bool = False) -> torch.device:
    """This rank's device (``train.device``: "auto" = CUDA when torch sees a GPU, else the CPU).

    GPU: :func:`devices.gpu_index` of the node-local rank (device 0 when each rank sees one GPU,
    e.g. ``srun --gpus-per-task=1``; ``local_rank % visible`` when every rank sees the node's GPUs,
    e.g. ``mpiexec`` inside an allocation), its context created now (a GPU that cannot be used is
    a LaunchError), TF32 off unless ``allow_tf32``, deterministic kernels. Every rank also sets
    its torch CPU threads (``threads``, else :func:`devices.default_cpu_threads`)."""
    cores = os.cpu_count() or 1
    if threads > cores:       # torch would try to start that many OpenMP threads and crash far from here
        raise LaunchError(f"train.threads = {threads}: more than the {cores} CPU cores of this node")
    torch.set_num_threads(threads if threads > 0 else devices.default_cpu_threads(os.environ)[0])
    devices.tune_host_allocator(os.environ)
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        devices.set_deterministic_cuda()          # before the context: CUBLAS_WORKSPACE_CONFIG
        devices.set_tf32(allow_tf32)
        try:
            return devices.open_cuda(devices.gpu_index(world.local_rank, torch.cuda.device_count()))
        except RuntimeError as e:
            raise LaunchError(str(e)) from None
    if preference == "cuda":
        raise LaunchError("train.device = 'cuda' but torch sees no usable GPU on this rank")
    return torch.device("cpu")


def device_map(world: World, device: torch.device) -> tuple[list[dict], str | None, list[str]]:
    """Every rank's (host, device) record, and the mapping's error and warnings (same on every rank)."""
    import socket
    records = allgather(world, devices.device_record(socket.gethostname(), device))
    error, warnings = devices.mapping_problems(records)
    return records, error, warnings


def allreduce_sum(world: World, buffer: np.ndarray) -> np.ndarray:
    """In-place SUM Allreduce of a contiguous numpy buffer (int64 buffers sum exactly)."""
    if world.size > 1:
        world.comm.Allreduce(_mpi().IN_PLACE, buffer, op=_mpi().SUM)
    return buffer


class HostStage:
    """One reused host buffer through which device tensors are summed over ranks.

    The exact sums are decoded on the host anyway, so the device buffer is copied once into this
    buffer (page-locked when the device is a GPU: a faster copy, and no new allocation per round)
    and the Allreduce runs on it. Returned arrays are views into the buffer: valid until the next call.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int64):
        self.device, self.dtype = device, dtype
        self.host = torch.empty(0, dtype=dtype)

    def view(self, n: int) -> np.ndarray:
        """The first ``n`` elements of the buffer as numpy (grown, and pinned on CUDA, when needed)."""
        if self.host.numel() < n:
            self.host = torch.empty(n, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return self.host[:n].numpy()

    def allreduce(self, world: World, tensor: torch.Tensor) -> np.ndarray:
        """SUM over ranks of ``tensor`` (flattened): one device-to-host copy, one Allreduce.
        Returns a view of the reduced buffer."""
        n = tensor.numel()
        out = self.view(n)
        self.host[:n].copy_(tensor.reshape(-1))       # synchronous: the values are on the host after it
        return allreduce_sum(world, out)


def round_status(world: World, compute_time: float, stop: bool) -> tuple[float, float, bool]:
    """After a round, one tiny MAX Allreduce: the slowest and the fastest rank's compute time (load
    imbalance told apart from communication) and whether any rank was asked to stop."""
    buf = np.array([compute_time, -compute_time, float(stop)], dtype=np.float64)
    if world.size > 1:
        world.comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().MAX)
    return float(buf[0]), float(-buf[1]), bool(buf[2])


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
