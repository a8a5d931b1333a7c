"""GPU readiness, checked on the CPU: fixed agent chunks (padding changes no bit and makes no
result depend on how agents are spread over ranks), the device-mapping rules as pure functions,
the TF32 / agent-chunk config keys, and the reused host buffer of the Allreduce."""

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

from helpers import local_round_array, REPO, TEST_DEVICE
from mpifedmeta.engine import chunks
from mpifedmeta.federation import algorithm
from mpifedmeta.parallel import devices, dist
from mpifedmeta.run import config, session, start
from mpifedmeta.federation.block import build_block
from mpifedmeta.data import load_dataset


# --------------------------------------------------------------------------- chunk helpers

def test_spans_cover_every_item_once():
    assert chunks.spans(0, 4) == []
    assert chunks.spans(5, 0) == [(0, 5)]
    assert chunks.spans(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunks.spans(4, 4) == [(0, 4)]
    assert chunks.spans(3, 32) == [(0, 3)]


def test_pad_repeats_row_0_or_fills():
    t = torch.arange(6).view(3, 2)
    p = chunks.pad(t, 5)
    assert p.shape == (5, 2) and p[3:].tolist() == [[0, 1], [0, 1]] and torch.equal(p[:3], t)
    z = chunks.pad(t.float(), 4, 0.0)
    assert z[3].tolist() == [0.0, 0.0]
    assert chunks.pad(t, 2) is t
    got = [(a, b, i[0].shape[0], m[0][:, 0].tolist()) for a, b, i, m in chunks.each(3, 2, (t,), (t.float(),))]
    assert got == [(0, 2, 2, [0.0, 2.0]), (2, 3, 2, [4.0, 0.0])]     # the last chunk padded: index row 0, mask 0
    assert [i[0].shape[0] for _, _, i, _ in chunks.each(3, 2, (t,), (), fixed=False)] == [2, 1]
    assert [(a, b) for a, b, _, _ in chunks.each(3, 0, (t,))] == [(0, 3)]


# --------------------------------------------------------------------------- padding changes no bit

_SETUPS = {}


def _setup(batch_size, dtype, method="exact", model="mlp"):
    key = (batch_size, dtype, method, model)
    if key not in _SETUPS:
        cfg = config.load(None, ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=5",
                                 "train.local_steps=2", "train.nu=2", "train.alpha=0.05", "train.beta=0.05",
                                 "model.hidden=[16]", 'data.partition="dirichlet"', f"train.batch_size={batch_size}",
                                 f'train.dtype="{dtype}"', f'train.metagrad="{method}"', f'model.name="{model}"',
                                 'output.dir="/nonexistent/never-written"', f'train.device="{TEST_DEVICE}"'])
        threads = torch.get_num_threads()
        s = session.setup(cfg, dist.World(MPI.COMM_SELF, 0, 1, 0, 1))
        torch.set_num_threads(threads)
        _SETUPS[key] = (s, load_dataset("digits", ""), s.w0)
    return _SETUPS[key]


SPLITS = [[(0, 12)], [(0, 6), (6, 12)], [(0, 4), (4, 8), (8, 12)], [(0, 1), (1, 7), (7, 12)]]
COHORT = np.array([0, 2, 3, 6, 7], dtype=np.int64)
CHUNKS = [0, 1, 2, 3, 32]


def _limbs(s, ds, params, split, agent_chunk, fn="round"):
    import dataclasses
    spec = dataclasses.replace(s.round.spec, agent_chunk=agent_chunk)
    w = algorithm.cohort_weights(COHORT, s.population.train_counts, "samples")
    total = 0
    for lo, hi in split:
        blk = build_block(ds.x, ds.y, s.population.partition, lo, hi, s.device, s.dtype)
        if fn == "round":
            limbs, bad = local_round_array(s.round.backend, blk, params, spec, 1, COHORT, w)
            assert bad.shape == () and int(bad) == 0
        else:
            limbs = algorithm.stationarity_block(s.round.backend, blk, params, s.num_train, 2, 0.05, 256, agent_chunk).cpu().numpy()
        total = total + limbs
    return total


@pytest.mark.parametrize("batch_size, dtype", [(8, "float32"), (8, "float64"), ('"full"', "float32")])
def test_agent_chunk_padding_changes_no_bit_and_no_rank_split(batch_size, dtype):
    s, ds, params = _setup(batch_size, dtype)
    ref = _limbs(s, ds, params, SPLITS[0], 0)
    for C in CHUNKS:
        for split in SPLITS:
            assert np.array_equal(ref, _limbs(s, ds, params, split, C)), (C, split)


@pytest.mark.parametrize("method", ["fo", "hf"])
def test_agent_chunk_padding_other_flavours(method):
    s, ds, params = _setup(8, "float32", method)
    ref = _limbs(s, ds, params, SPLITS[0], 0)
    for C, split in [(2, SPLITS[2]), (32, SPLITS[3])]:
        assert np.array_equal(ref, _limbs(s, ds, params, split, C)), (C, split)


def test_agent_chunk_padding_stationarity():
    s, ds, params = _setup(8, "float64")
    ref = _limbs(s, ds, params, SPLITS[0], 0, "stationarity")
    for C, split in [(1, SPLITS[1]), (3, SPLITS[2]), (32, SPLITS[3])]:
        assert np.array_equal(ref, _limbs(s, ds, params, split, C, "stationarity")), (C, split)


def test_agent_chunk_padding_evaluation():
    s, ds, params = _setup(8, "float32")
    ids = np.array([0, 3, 6, 10, 11], dtype=np.int64)

    def rows(split, C):
        return np.concatenate([algorithm.evaluate_block(
            s.round.backend, build_block(ds.x, ds.y, s.population.partition, lo, hi, s.device, s.dtype), params, ids,
            [0, 1, 2], 0.05, 256, C) for lo, hi in split])

    ref = rows(SPLITS[0], 0)
    for C in (1, 2, 4, 32):
        for split in SPLITS[1:]:
            assert np.array_equal(ref, rows(split, C)), (C, split)


def test_vmap_evaluation_does_not_depend_on_the_rank_split():
    """The quickstart's evaluation under vmap, its 40 training agents in one block (P = 1) or split as on
    2, 3 and 4 ranks: the same bits. (Before the padded widths were multiples of block.ALIGN_ROWS,
    agent 24's loss after 2 steps differed by 1 ulp between the one-block and the two-block split.)"""
    cfg = config.load(os.path.join(REPO, "configs", "quickstart.toml"),
                      ['train.strategy="vmap"', 'output.dir="/nonexistent/never-written"', f'train.device="{TEST_DEVICE}"'])
    threads = torch.get_num_threads()
    s = session.setup(cfg, dist.World(MPI.COMM_SELF, 0, 1, 0, 1))
    torch.set_num_threads(threads)
    ds = load_dataset("digits", "")
    ids = np.arange(40, dtype=np.int64)
    params = s.w0 + 0.3 * torch.randn(s.w0.shape, generator=torch.Generator().manual_seed(0)).to(s.w0)

    def rows(split):
        return np.concatenate([algorithm.evaluate_block(
            s.round.backend, build_block(ds.x, ds.y, s.population.partition, lo, hi, s.device, s.dtype), params, ids,
            [0, 1, 2], 0.05, 256) for lo, hi in split])

    ref = rows([(0, 50)])
    for split in ([(0, 25), (25, 50)], [(0, 17), (17, 34), (34, 50)], [(0, 13), (13, 26), (26, 38), (38, 50)]):
        assert np.array_equal(ref, rows(split)), split


def test_divergence_count_stays_on_the_device():
    s, ds, params = _setup(8, "float32")
    bad_params = params.clone()
    bad_params[0] = float("nan")
    blk = build_block(ds.x, ds.y, s.population.partition, 0, 12, s.device, s.dtype)
    w = algorithm.cohort_weights(COHORT, s.population.train_counts, "uniform")
    limbs, bad = local_round_array(s.round.backend, blk, bad_params, s.round.spec, 1, COHORT, w)
    assert isinstance(bad, torch.Tensor) and bad.device == blk.device and int(bad) > 0


def test_agent_chunk_run_recorded_and_identical_to_unpadded(tmp_path):
    """A whole run with train.agent_chunk = 2 gives the unpadded run's bits; metrics.h5 records it."""
    import h5py
    from helpers import final_model, read_metrics, arrays_identical
    outs = {}
    for C in (0, 2):
        outs[C] = str(tmp_path / f"C{C}")
        cfg = config.load(None, ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=5",
                                 "train.local_steps=2", "train.nu=2", "model.hidden=[16]", "train.rounds=2",
                                 "eval.every=2", "eval.stationarity=true", f"train.agent_chunk={C}",
                                 f'output.dir="{outs[C]}"', f'train.device="{TEST_DEVICE}"'])
        assert start.start_new(cfg, dist.World(MPI.COMM_SELF, 0, 1, 0, 1)) == 0
    a, b = final_model(outs[0]), final_model(outs[2])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(outs[0]), read_metrics(outs[2])
    for name in ("train/train_loss", "eval/train_agent_loss", "eval/holdout_agent_acc", "eval/grad_norm_sq"):
        assert arrays_identical(ma[name], mb[name]), name
    with h5py.File(outs[2] + "/metrics.h5") as f:
        assert int(f.attrs["agent_chunk"]) == 2 and not f.attrs["tf32"] and f.attrs["device"] == TEST_DEVICE
    with h5py.File(outs[0] + "/metrics.h5") as f:
        assert int(f.attrs["agent_chunk"]) == 0


# --------------------------------------------------------------------------- config keys

def test_agent_chunk_and_tf32_keys_validated():
    assert config.load(None).train.agent_chunk == "auto"
    assert config.load(None).train.allow_tf32 is False
    assert config.load(None, ["train.agent_chunk=16"]).train.agent_chunk == 16
    for bad in ("-1", '"big"', "1.5", "true"):
        with pytest.raises(config.ConfigError, match="train.agent_chunk"):
            config.load(None, [f"train.agent_chunk={bad}"])
    with pytest.raises(config.ConfigError, match="train.allow_tf32"):
        config.load(None, ["train.allow_tf32=1"])
    with pytest.raises(config.ConfigError, match="train.allow_tf32 = true with train.metagrad = 'hf'"):
        config.load(None, ["train.allow_tf32=true", 'train.metagrad="hf"'])
    config.load(None, ["train.allow_tf32=true", 'train.metagrad="hf"', 'train.dtype="float64"'])
    config.load(None, ["train.allow_tf32=true", 'train.metagrad="exact"'])


def test_resolve_agent_chunk():
    assert devices.resolve_agent_chunk("auto", "cpu") == 0
    assert devices.resolve_agent_chunk("auto", "cuda") == devices.AUTO_AGENT_CHUNK_CUDA == 32
    assert devices.resolve_agent_chunk(7, "cpu") == 7 and devices.resolve_agent_chunk(0, "cuda") == 0


# --------------------------------------------------------------------------- device mapping (pure functions)

@pytest.mark.parametrize("local_rank, visible, want", [
    (0, 1, 0), (3, 1, 0),          # srun --gpus-per-task=1: each task sees its own GPU as device 0
    (0, 4, 0), (1, 4, 1), (5, 4, 1), (3, 2, 1),   # mpiexec inside an allocation: local rank % visible
])
def test_gpu_index(local_rank, visible, want):
    assert devices.gpu_index(local_rank, visible) == want


def test_gpu_index_needs_a_gpu():
    with pytest.raises(ValueError):
        devices.gpu_index(0, 0)


def _rec(host, type_, uuid="", name="H200", sms=132):
    return {"host": host, "type": type_, "index": 0 if type_ == "cuda" else None, "name": name if type_ == "cuda" else "cpu",
            "uuid": uuid, "sms": sms if type_ == "cuda" else None, "visible": "unset"}


def test_mapping_refuses_mixed_cpu_and_gpu_ranks():
    err, warnings = devices.mapping_problems([_rec("a", "cuda", "u0"), _rec("b", "cpu"), _rec("b", "cpu")])
    assert err is not None and "rank(s) 0 on a GPU" in err and "rank(s) 1,2 on the CPU" in err
    assert "\n" not in err


def test_mapping_warns_when_ranks_share_a_gpu():
    # srun per-task CUDA_VISIBLE_DEVICES: every rank says cuda:0, the UUIDs tell the GPUs apart
    err, warnings = devices.mapping_problems([_rec("a", "cuda", "u0"), _rec("a", "cuda", "u1"), _rec("b", "cuda", "u0")])
    assert err is None and warnings == []            # same UUID on another host is another GPU
    err, warnings = devices.mapping_problems([_rec("a", "cuda", "u0"), _rec("a", "cuda", "u1"), _rec("a", "cuda", "u0")])
    assert err is None and len(warnings) == 1 and "ranks 0,2 share one GPU" in warnings[0]
    err, warnings = devices.mapping_problems([_rec("a", "cpu"), _rec("a", "cpu")])
    assert err is None and warnings == []


def test_mapping_warns_on_different_gpu_models():
    err, warnings = devices.mapping_problems([_rec("a", "cuda", "u0"), _rec("b", "cuda", "u1", name="A100", sms=108)])
    assert err is None and any("different GPU models" in w for w in warnings)


def test_device_record_of_the_cpu():
    rec = devices.device_record("h", torch.device("cpu"))
    assert rec["type"] == "cpu" and rec["host"] == "h" and rec["uuid"] == ""


def test_choose_device_honours_train_device_and_sets_threads(monkeypatch):
    world = dist.World(MPI.COMM_SELF, 0, 1, 0, 1)
    before = torch.get_num_threads()
    try:
        assert dist.choose_device(world, "cpu", 1).type == "cpu" and torch.get_num_threads() == 1
        if not torch.cuda.is_available():
            assert dist.choose_device(world, "auto", 1).type == "cpu"
            with pytest.raises(dist.LaunchError, match="train.device = 'cuda'"):
                dist.choose_device(world, "cuda", 1)
    finally:
        torch.set_num_threads(before)


def test_cuda_context_failure_is_one_line(monkeypatch):
    def boom(device):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore text")
    monkeypatch.setattr(torch.cuda, "set_device", boom)
    with pytest.raises(RuntimeError) as e:
        devices.open_cuda(0)
    msg = str(e.value)
    assert "\n" not in msg and "busy or unavailable" in msg and "exclusive-process" in msg


def test_no_cuda_aware_branch_left():
    assert not hasattr(dist, "cuda_aware") and not hasattr(dist, "allreduce_tensor")


# --------------------------------------------------------------------------- the reused host buffer

def test_host_stage_reuses_one_buffer():
    world = dist.World(MPI.COMM_SELF, 0, 1, 0, 1)
    stage = dist.HostStage(torch.device("cpu"))
    a = stage.allreduce(world, torch.arange(7, dtype=torch.int64))
    assert a.tolist() == [0, 1, 2, 3, 4, 5, 6]
    buf = stage.host
    b = stage.allreduce(world, torch.full((4,), 9, dtype=torch.int64))
    assert b.tolist() == [9, 9, 9, 9] and stage.host is buf           # no new allocation
    assert not stage.host.is_pinned()                                  # pinned only for a GPU


# --------------------------------------------------------------------------- gpu_check.sh and its comparer

def test_compare_runs_finds_any_differing_bit():
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(REPO, "benchmarks", "compare_runs.py"))
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)
    p = {"w": np.arange(4, dtype=np.float32)}
    t = {"train/meta_loss": np.array([1.0, np.nan])}
    ref = (3, p, t)
    assert cr.differences(ref, (3, {"w": p["w"].copy()}, {"train/meta_loss": t["train/meta_loss"].copy()})) == []
    q = p["w"].copy()
    q[2] = np.nextafter(q[2], np.float32(9))
    assert cr.differences(ref, (3, {"w": q}, t))[0].startswith("model/w")
    assert cr.differences(ref, (3, {"w": p["w"].astype(np.float64)}, t))        # dtype counts
    assert cr.differences(ref, (3, p, {"train/meta_loss": np.array([1.0, 0.0])})) == ["train/meta_loss"]
    assert cr.differences(ref, (2, p, t)) == ["final round 3 vs 2"]
    assert cr.is_timing("compute_time_min") and cr.is_timing("wall_time") and not cr.is_timing("meta_loss")


def test_gpu_check_script_parses_and_checks_its_arguments():
    import subprocess
    script = os.path.join(REPO, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    for args in ([], ["OUT", "--device", "tpu"], ["OUT", "--what"]):
        proc = subprocess.run(["bash", script] + args, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr


def test_compile_fallback_notice_is_one_line_on_rank_0_only(monkeypatch, capsys):
    from mpifedmeta.engine import compiled
    monkeypatch.setattr(compiled, "_failed", {})
    monkeypatch.setattr(compiled, "ANNOUNCE", False)            # what setup() sets on ranks other than 0
    compiled._notice(("a",), "torch.compile failed (x)")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(compiled, "ANNOUNCE", True)
    for _ in range(2):
        compiled._notice(("b",), "torch.compile failed (y)")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed (y)" in err[0] and "eagerly" in err[0]


def test_pad_keeps_broadcast_dimensions_broadcast():
    idx = torch.arange(6).view(3, 1, 1, 2).expand(3, 4, 1, 2)      # full batches: the same rows in every step
    p = chunks.pad(idx, 5)
    assert p.shape == (5, 4, 1, 2) and p.stride(1) == 0
    assert torch.equal(p[:3], idx) and torch.equal(p[3:], idx[:1].expand(2, 4, 1, 2))
    m = chunks.pad(torch.ones(3, 1, 1, 2).expand(3, 4, 1, 2), 5, 0.0)
    assert m.stride(1) == 0 and m[3:].sum() == 0 and m[:3].sum() == 24
