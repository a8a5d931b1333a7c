"""`mpifedmeta info`: what a user checks first on a new cluster."""

from __future__ import annotations

import os
import platform
import socket

import torch

from . import __version__, dist, io


def rank_line(world: dist.World) -> str:
    device = dist.choose_device(world, "auto", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return (f"rank {world.rank:>4}  host {socket.gethostname()}  local rank {world.local_rank}/{world.local_size}  "
            f"device {device} ({name})  torch threads {torch.get_num_threads()}  CUDA_VISIBLE_DEVICES={visible}")


def print_info(world: dist.World) -> None:
    """Gather one line per rank and print them on rank 0 with library versions."""
    lines = dist.allgather(world, rank_line(world))
    if not world.is_root:
        return
    import numpy
    print(f"mpifedmeta {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {numpy.__version__}  h5py {io.h5py_version()}  mpi4py {dist.mpi4py_version()}")
    print(f"MPI: {dist.mpi_library()}")
    print(f"ranks: {world.size}   CUDA available: {torch.cuda.is_available()} "
          f"({torch.cuda.device_count()} visible GPUs on rank 0)   CUDA-aware MPI: {dist.cuda_aware()}")
    for line in lines:
        print(line)
