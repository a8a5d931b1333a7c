"""`mpifedmeta info`: what a user checks first on a new cluster."""

from __future__ import annotations

import os
import platform
import socket
import sys

import torch

from mpifedmeta import __version__
from mpifedmeta.parallel import devices, dist
from mpifedmeta.storage import hdf5


def rank_line(world: dist.World, device: torch.device, record: dict) -> str:
    name = record["name"] if device.type == "cuda" else platform.processor() or "cpu"
    gpu = f", {record.get('sms', '?')} SMs, uuid {record['uuid']}" if device.type == "cuda" else ""
    return (f"rank {world.rank:>4}  host {socket.gethostname()}  local rank {world.local_rank}/{world.local_size}  "
            f"device {device} ({name}{gpu})  torch threads {torch.get_num_threads()}{_threads_why()}  "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}  "
            f"SLURM_LOCALID={os.environ.get('SLURM_LOCALID', 'unset')}  "
            f"host allocator {devices.tune_host_allocator(os.environ).split(' (')[0]}")


def _threads_why() -> str:
    why = devices.default_cpu_threads(os.environ)
    return f" ({why[1]})" if why[0] == torch.get_num_threads() else ""


def print_info(world: dist.World) -> int:
    """Gather one line per rank and print them on rank 0 with library versions and the device
    mapping's problems. Returns the exit code: 2 when a rank cannot use its device or the mapping
    mixes CPU and GPU ranks (what `mpifedmeta run` would refuse), else 0."""
    err = None
    device = torch.device("cpu")
    try:
        device = dist.choose_device(world, "auto", 0)
    except dist.LaunchError as e:
        err = str(e)
    err = dist.first_error(world, err)
    records, map_err, warnings = dist.device_map(world, device)
    lines = dist.allgather(world, rank_line(world, device, records[world.rank]))
    if not world.is_root:
        return 2 if (err or map_err) else 0
    import numpy
    print(f"mpifedmeta {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {numpy.__version__}  h5py {hdf5.h5py_version()}  mpi4py {dist.mpi4py_version()}")
    print(f"MPI: {dist.mpi_library()}")
    cuda = f"CUDA {torch.version.cuda}, " if torch.version.cuda else ""
    print(f"ranks: {world.size}   CUDA available: {torch.cuda.is_available()} "
          f"({cuda}{torch.cuda.device_count()} visible GPUs on rank 0)")
    for line in lines:
        print(line)
    for w in warnings:
        print(f"warning: {w}")
    if err or map_err:
        print(f"mpifedmeta: error: {err or map_err}", file=sys.stderr, flush=True)
        return 2
    return 0
