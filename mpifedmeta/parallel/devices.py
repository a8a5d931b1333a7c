"""Device choice and numerics, as small functions with no MPI: which GPU a rank takes, the CUDA
switches that make results reproducible, and what is wrong with a job's (host, device) mapping.

dist.choose_device calls these on every rank; the mapping rules are pure functions of plain
values (an environment, device counts, per-rank records) so that they are unit-tested without a GPU.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

CUBLAS_WORKSPACE = ":4096:8"     # cuBLAS needs a fixed workspace configuration for reproducible GEMMs
AUTO_AGENT_CHUNK_CUDA = 32       # train.agent_chunk = "auto" on CUDA (0 = off on CPU)


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU (an index among the ``visible`` ones) that a rank with this node-local rank takes.

    One visible GPU (``srun --gpus-per-task=1``, or a launcher that sets CUDA_VISIBLE_DEVICES per
    task): device 0. Several (``mpiexec`` inside an allocation, every rank sees the node's GPUs):
    ``local_rank % visible``, so ranks fill the GPUs round-robin.
    """
    if visible < 1:
        raise ValueError("no visible GPU")
    return 0 if visible == 1 else local_rank % visible


def resolve_agent_chunk(setting, device_type: str) -> int:
    """``train.agent_chunk``: an int (0 = off), or "auto" = 32 on CUDA and off on the CPU."""
    if setting == "auto":
        return AUTO_AGENT_CHUNK_CUDA if device_type == "cuda" else 0
    return int(setting)


def default_cpu_threads(env) -> tuple[int, str]:
    """(torch threads, why) of a rank when ``train.threads`` is 0: ``OMP_NUM_THREADS`` if set, else
    ``SLURM_CPUS_PER_TASK`` if set (the CPUs SLURM gave the task), else ONE.

    One thread per rank, with ranks as the way to use a node's cores, is the HPC convention and the
    default because OpenMP threads spin-wait for each other: two threads on a 2-core machine beside
    one other busy process made a run > 5x slower (one descheduled thread stalls every parallel
    region), while one thread lost nothing there (benchmarks/busy_node.py measures both). At FL sizes
    the per-agent products are small, so a second thread buys little even on an idle machine.
    """
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = str(env.get(name, "")).strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"${name}"
    return 1, "one per rank (default; more cores: more ranks, or train.threads)"


# glibc mallopt parameters (malloc.h) and the values the engine sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))


def tune_host_allocator(env) -> str:
    """Keep freed host memory for reuse instead of returning it to the kernel (glibc only).

    A round allocates and frees many block-sized tensors (a (32, 68k) float32 gradient is 8.7 MB).
    glibc serves such sizes with fresh mmap()s and gives them back with munmap(), so every one
    costs page faults on first touch: measured 25% of a digits round (24.7 → 18.0 ms,
    benchmarks/roofline.py). Raising the mmap threshold to its maximum (32 MB) and the trim
    threshold keeps them in the heap — what tcmalloc/jemalloc do, which torch recommends on CPU.
    Left alone when the user set any ``MALLOC_*`` variable or MPIFEDMETA_MALLOC=default, and off
    glibc. Returns what was done (for ``mpifedmeta info``)."""
    if env.get("MPIFEDMETA_MALLOC", "") == "default" or any(k.startswith("MALLOC_") for k in env):
        return "default (left as configured)"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        if not all(libc.mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS):
            return "default (mallopt refused)"
    except (OSError, AttributeError):
        return "default (not glibc)"
    return "tuned (mmap threshold 32 MB, no trimming below 1 GB)"


def set_tf32(allow: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions: off unless ``allow`` (legacy flags only:
    torch refuses to read the TF32 state after a mix of the legacy and the new fp32_precision API)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    torch.set_float32_matmul_precision("high" if allow else "highest")


def set_deterministic_cuda() -> None:
    """Reproducible CUDA kernels: a fixed cuBLAS workspace (must be in the environment before the
    first cuBLAS handle is created), deterministic cuDNN algorithms without benchmarking, and
    torch's deterministic implementations where they exist (warn_only: an op that has none warns
    instead of failing; none is used by the engine's double backward as far as tested)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def open_cuda(index: int) -> torch.device:
    """Select GPU ``index`` and create its context now, so that a GPU that cannot be used (exclusive-
    process mode with another process on it, out of memory, a broken driver) fails at start-up with
    one line instead of in the middle of round 1. Raises RuntimeError with that line."""
    device = torch.device("cuda", index)
    try:
        torch.cuda.set_device(device)
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except Exception as e:   # CUDA errors surface as RuntimeError / torch.AcceleratorError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot create a CUDA context on {device} ({first}); is the GPU in exclusive-process "
                           "compute mode and already used by another rank or process? (nvidia-smi -q -d COMPUTE)") from None
    return device


def device_record(host: str, device: torch.device) -> dict:
    """What a rank tells the others about its device (plain values, for allgather)."""
    rec = {"host": host, "type": device.type, "index": device.index, "name": "cpu", "uuid": "",
           "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec["name"] = props.name
        rec["sms"] = int(getattr(props, "multi_processor_count", 0))
        rec["capability"] = f"{props.major}.{props.minor}"
        uuid = getattr(props, "uuid", None)
        # Without a UUID the visible list and index identify the GPU (exact unless per-task lists differ)
        rec["uuid"] = str(uuid) if uuid is not None else f"{rec['visible']}#{device.index}"
    return rec


def mapping_problems(records: list[dict]) -> tuple[str | None, list[str]]:
    """(error, warnings) about the job's (host, device) mapping, one record per rank in rank order.

    Error: some ranks on a GPU and others on the CPU (the fixed agent chunk, the numerics and hence
    the results would differ by rank). Warnings: ranks sharing one GPU (they serialise on it);
    GPUs of different models or SM counts (bit-identical results across ranks need the same ones).
    """
    types = {r["type"] for r in records}
    if len(types) > 1:
        cpu = [i for i, r in enumerate(records) if r["type"] == "cpu"]
        gpu = [i for i, r in enumerate(records) if r["type"] == "cuda"]
        return (f"mixed devices: rank(s) {_ranks(gpu)} on a GPU but rank(s) {_ranks(cpu)} on the CPU; give every rank a "
                "GPU or run all on the CPU (train.device = \"cpu\")"), []
    warnings = []
    if types == {"cuda"}:
        shared = defaultdict(list)
        for i, r in enumerate(records):
            shared[(r["host"], r["uuid"])].append(i)
        for (host, _), ranks in shared.items():
            if len(ranks) > 1:
                warnings.append(f"ranks {_ranks(ranks)} share one GPU ({records[ranks[0]]['name']}) on {host}: they "
                                "take turns on it; request one GPU per rank (e.g. --gpus-per-task=1) for speed")
        kinds = {(r["name"], r.get("sms")) for r in records}
        if len(kinds) > 1:
            warnings.append("ranks use different GPU models or SM counts (" + ", ".join(f"{n} / {s} SMs" for n, s in sorted(kinds))
                            + "): results are reproducible only on identical GPUs")
    return None, warnings


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
