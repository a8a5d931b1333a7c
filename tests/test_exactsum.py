"""Exact order-independent summation (mpifedmeta.core.exactsum) and counter-based randomness (mpifedmeta.core.rng)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mpifedmeta.core import exactsum, rng

GRID = Fraction(1, 2 ** 72)


def limb_value(limbs) -> list[Fraction]:
    """The exact rational each column of raw (un-normalised) limbs stands for: hi·2⁻³² + lo·2⁻⁷²."""
    limbs = np.asarray(limbs, dtype=np.int64)
    return [Fraction(int(h), 2 ** 32) + Fraction(int(lo), 2 ** 72) for h, lo in zip(limbs[0], limbs[1])]


def exact_sums(values: np.ndarray) -> list[Fraction]:
    return [sum((Fraction(float(v)) for v in values[:, j]), Fraction(0)) for j in range(values.shape[1])]


def check_against_fractions(values: np.ndarray) -> None:
    n_terms = values.shape[0]
    limbs = exactsum.encode_sum(torch.as_tensor(values))
    assert limbs.dtype == torch.int64 and tuple(limbs.shape) == (2, values.shape[1])
    decoded = exactsum.decode(limbs)
    assert decoded.dtype == np.float64 and decoded.shape == (values.shape[1],)
    # each term is rounded once to the 2⁻⁷² grid (error ≤ 2⁻⁷³ per term)
    bound = n_terms * Fraction(1, 2 ** 73)
    for j, (lv, ex) in enumerate(zip(limb_value(limbs.numpy()), exact_sums(values))):
        assert abs(lv - ex) <= bound, j
        if n_terms <= 8:
            assert abs(lv - ex) <= Fraction(1, 2 ** 70), j
        # decode rounds the limb value once, correctly
        assert decoded[j] == float(lv), j
        assert abs(Fraction(float(decoded[j])) - ex) <= bound + Fraction(math.ulp(float(ex))) / 2, j


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_terms", [1, 2, 5, 8])
def test_random_float64_sums_are_exact(seed, n_terms):
    g = np.random.default_rng(seed)
    check_against_fractions(g.standard_normal((n_terms, 40)) * g.choice([1e-3, 1.0, 100.0], size=(1, 40)))


@pytest.mark.parametrize("seed", range(4))
def test_mixed_magnitudes_and_signs(seed):
    g = np.random.default_rng(100 + seed)
    n_terms, n = 8, 60
    mags = 10.0 ** g.uniform(-12, 4, size=(n_terms, n))
    check_against_fractions(mags * g.choice([-1.0, 1.0], size=(n_terms, n)))


def test_many_terms():
    g = np.random.default_rng(7)
    values = (10.0 ** g.uniform(-6, 3, size=(3000, 4))) * g.choice([-1.0, 1.0], size=(3000, 4))
    check_against_fractions(values)


def test_catastrophic_cancellation_is_exact():
    values = np.array([[1e4, 3.0, -0.5], [1e-12, -3.0, 2 ** -40], [-1e4, 2 ** -60, 0.5]])
    decoded = exactsum.decode(exactsum.encode_sum(torch.as_tensor(values)))
    assert abs(Fraction(decoded[0]) - Fraction(1e-12)) <= Fraction(3, 2 ** 73)
    assert decoded[1] == 2.0 ** -60
    assert decoded[2] == 2.0 ** -40
    assert float(np.sum(values[:, 0])) != decoded[0] or decoded[0] != 0.0   # naive float sum loses it


def test_values_on_the_grid_sum_exactly():
    g = np.random.default_rng(3)
    k = g.integers(-2 ** 40, 2 ** 40, size=(20, 30))
    values = k.astype(np.float64) * 2.0 ** -30          # exact multiples of 2⁻³⁰, |v| < 2¹⁰
    decoded = exactsum.decode(exactsum.encode_sum(torch.as_tensor(values)))
    exact = k.sum(axis=0).astype(np.float64) * 2.0 ** -30
    assert np.array_equal(decoded, exact)


def test_float32_terms_are_taken_exactly():
    g = np.random.default_rng(5)
    v32 = g.standard_normal((6, 10)).astype(np.float32)
    a = exactsum.encode_sum(torch.as_tensor(v32))
    b = exactsum.encode_sum(torch.as_tensor(v32.astype(np.float64)))
    assert torch.equal(a, b)


def test_empty_sum_is_zero():
    limbs = exactsum.encode_sum(torch.zeros(0, 5, dtype=torch.float64))
    assert torch.equal(limbs, torch.zeros(2, 5, dtype=torch.int64))
    assert np.array_equal(exactsum.decode(limbs), np.zeros(5))


def test_decode_accepts_numpy_and_torch_and_does_not_modify_input():
    g = np.random.default_rng(11)
    limbs = exactsum.encode_sum(torch.as_tensor(g.standard_normal((50, 7))))
    arr = limbs.numpy().copy()
    before = arr.copy()
    assert np.array_equal(exactsum.decode(limbs), exactsum.decode(arr))
    assert np.array_equal(arr, before)


@pytest.mark.parametrize("seed", range(5))
def test_any_split_or_permutation_gives_identical_limbs(seed):
    g = np.random.default_rng(seed)
    n_terms, n = 23, 50
    values = (10.0 ** g.uniform(-12, 4, size=(n_terms, n))) * g.choice([-1.0, 1.0], size=(n_terms, n))
    ref = exactsum.encode_sum(torch.as_tensor(values)).numpy()
    for _ in range(6):
        perm = g.permutation(n_terms)
        cuts = np.sort(g.integers(0, n_terms + 1, size=g.integers(0, 6)))       # empty parts allowed
        parts = np.split(values[perm], cuts)
        total = np.zeros((2, n), dtype=np.int64)
        for part in parts:
            total += exactsum.encode_sum(torch.as_tensor(part)).numpy()
        assert np.array_equal(total, ref)
        assert exactsum.decode(total).tobytes() == exactsum.decode(ref).tobytes()


def test_reordering_changes_naive_float_sums_but_not_exact_ones():
    g = np.random.default_rng(1)
    values = (10.0 ** g.uniform(-12, 4, size=(200, 1))) * g.choice([-1.0, 1.0], size=(200, 1))
    naive = {float(np.sum(values[g.permutation(200)])) for _ in range(20)}
    exact = {exactsum.decode(exactsum.encode_sum(torch.as_tensor(values[g.permutation(200)])))[0]
             for _ in range(20)}
    assert len(exact) == 1
    assert len(naive) >= 1     # (usually > 1: that is why exactsum exists)


def test_out_of_range_counts_nan_inf_and_huge():
    lim = exactsum.LIMIT
    v = torch.tensor([[1.0, float("nan"), float("inf"), -float("inf"), lim, -lim, lim - 2 ** -20, 1e300, -1e300, 0.0]],
                     dtype=torch.float64)
    assert exactsum.out_of_range(v) == 7
    v32 = torch.tensor([[1.0, float("nan"), float("inf"), -float("inf"), lim, -lim, 65535.0, 1e30, -1e30, 0.0]],
                       dtype=torch.float32)
    assert exactsum.out_of_range(v32) == 7
    assert exactsum.out_of_range(torch.zeros(3, 4)) == 0
    # encode_sum ignores the unrepresentable terms (the caller reports divergence)
    decoded = exactsum.decode(exactsum.encode_sum(v))
    assert np.all(np.isfinite(decoded))
    assert decoded[0] == 1.0 and decoded[6] == lim - 2 ** -20 and decoded[9] == 0.0
    for j in (1, 2, 3, 4, 5, 7, 8):
        assert decoded[j] == 0.0


def test_out_of_range_counts_over_all_terms():
    v = torch.ones(4, 5, dtype=torch.float64)
    v[0, 0] = float("nan")
    v[3, 4] = 1e6
    v[2, 2] = -float("inf")
    assert exactsum.out_of_range(v) == 3


# --------------------------------------------------------------------------- rng

def _batch(agents, counts, seed=0, round_=1, steps=3, slots=2, batch=5):
    return rng.batch_indices(seed, round_, torch.as_tensor(agents, dtype=torch.int64),
                             torch.as_tensor(counts, dtype=torch.int64), steps, slots, batch)


# --------------------------------------------------------------------------- the round's displacement sums

def _average(theta: np.ndarray, w: np.ndarray, c: np.ndarray, splits) -> np.ndarray:
    """The engine's FedAvg average of the rows of ``theta`` (weights ``c``) with the rows split into
    blocks as given (each block encoded separately, the int64 sums added: what the ranks do)."""
    C = int(c.sum())
    bits = exactsum.grid_bits(C)
    dt = torch.float64 if theta.dtype == np.float64 else torch.float32
    scale = torch.as_tensor(c, dtype=torch.float64) * 2.0 ** bits
    total = np.zeros(theta.shape[1], dtype=np.int64)
    for a, b in splits:
        q, bad = exactsum.encode_displacements(torch.as_tensor(theta[a:b]), torch.as_tensor(w), scale[a:b].to(dt))
        assert int(bad) == 0
        total += q.numpy()
    return exactsum.decode_displacements(total, w.astype(np.float64), bits, C)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weights", ["uniform", "samples"])
def test_displacement_average_is_within_the_stated_bound_of_float64(seed, weights):
    g = np.random.default_rng(seed)
    m, d = 32, 500
    w = g.standard_normal(d) * 0.5
    theta = w + g.standard_normal((m, d)) * 10.0 ** g.uniform(-6, 0, size=(m, 1))
    c = np.ones(m, np.int64) if weights == "uniform" else g.integers(1, 5000, m)
    got = _average(theta, w, c, [(0, m)])
    exact = [sum((Fraction(int(ci)) * (Fraction(float(t)) - Fraction(float(w[j]))) for ci, t in zip(c, theta[:, j])),
                 Fraction(0)) / int(c.sum()) + Fraction(float(w[j])) for j in range(0, d, 25)]
    bound = m * 2.0 ** -45                          # the module docstring's bound, plus float64 rounding
    errs = [abs(float(Fraction(float(got[j])) - e)) for j, e in zip(range(0, d, 25), exact)]
    assert max(errs) <= bound + 4 * np.spacing(np.abs(got).max()), max(errs)
    assert max(abs(got - (c[:, None] * theta).sum(0) / c.sum())) < 1e-9     # the float64 reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_displacement_sums_do_not_depend_on_the_split(dtype):
    g = np.random.default_rng(3)
    m, d = 12, 300
    w = (g.standard_normal(d) * 0.1).astype(dtype)
    theta = (w + g.standard_normal((m, d)) * 1e-3).astype(dtype)
    c = g.integers(1, 100, m)
    ref = _average(theta, w, c, [(0, m)])
    for splits in ([(0, 5), (5, 12)], [(0, 1), (1, 2), (2, 12)], [(i, i + 1) for i in range(m)]):
        assert np.array_equal(ref, _average(theta, w, c, splits)), splits


def test_displacement_flag_catches_nan_inf_and_out_of_range():
    w = torch.zeros(4)
    scale = torch.full((2,), 2.0 ** exactsum.grid_bits(2))
    for bad_value in (float("nan"), float("inf"), -float("inf"), 2.0 ** 16, -(2.0 ** 16)):
        theta = torch.zeros(2, 4)
        theta[1, 2] = bad_value
        assert int(exactsum.encode_displacements(theta, w, scale)[1]) == 1, bad_value
    ok = torch.full((2, 4), 2.0 ** 16 - 1)
    assert int(exactsum.encode_displacements(ok, w, scale)[1]) == 0


def test_grid_bits_keep_the_largest_sum_inside_int64():
    for C in (1, 2, 3, 32, 1000, 12345, 10 ** 7):
        k = exactsum.grid_bits(C)
        # every term |c_i (θ_i − w)| < c_i·2¹⁷, so the sum over the cohort stays below C·2¹⁷·2^k ≤ 2⁶²
        assert C * 2 ** 17 * 2 ** k <= 2 ** 62 < 2 * C * 2 ** 17 * 2 ** k
    with pytest.raises(ValueError):
        exactsum.grid_bits(0)
    c = np.array([3, 1])       # extreme displacements: the int64 sum neither overflows nor wraps
    theta = np.array([[2.0 ** 16 - 2 ** -4], [2.0 ** 16 - 2 ** -4]])
    w = np.array([-(2.0 ** 16) + 2 ** -4])
    got = _average(theta, w, c, [(0, 1), (1, 2)])
    assert got[0] == theta[0, 0]


def test_batch_indices_shape_range_dtype():
    agents, counts = [3, 7, 9, 11], [10, 50, 1, 1_000_003]
    idx = _batch(agents, counts)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (4, 3, 2, 5)
    for i, c in enumerate(counts):
        assert int(idx[i].min()) >= 0 and int(idx[i].max()) < c
    assert torch.all(idx[2] == 0)                               # one sample: always index 0


def test_batch_indices_do_not_depend_on_other_agents():
    alone = _batch([7], [50])[0]
    for agents, counts, pos in (([3, 7, 9], [10, 50, 1], 1), ([7, 100], [50, 2], 0),
                                ([0, 1, 2, 7], [5, 5, 5, 50], 3), ([7, 7], [50, 50], 1)):
        assert torch.equal(_batch(agents, counts)[pos], alone), agents


def test_batch_indices_depend_on_seed_round_agent():
    base = _batch([7], [1000])
    assert not torch.equal(base, _batch([7], [1000], round_=2))
    assert not torch.equal(base, _batch([7], [1000], seed=1))
    assert not torch.equal(base, _batch([8], [1000]))
    assert torch.equal(base, _batch([7], [1000]))               # pure function


def test_batch_indices_cover_all_samples_roughly_uniformly():
    idx = _batch([5], [10], steps=50, slots=4, batch=50)        # 10000 draws from 10 samples
    hist = np.bincount(idx.numpy().ravel(), minlength=10)
    assert hist.sum() == 10_000 and np.all(hist > 800) and np.all(hist < 1200), hist


def test_batch_indices_steps_and_slots_are_different_streams():
    idx = _batch([5], [1_000_000], steps=4, slots=3, batch=8)[0]
    flat = idx.reshape(-1, 8)
    assert len({tuple(r.tolist()) for r in flat}) == flat.shape[0]


@pytest.mark.parametrize("seed, round_, n, k", [(0, 1, 10, 5), (3, 17, 100, 10), (1, 2, 7, 7), (5, 9, 1000, 1),
                                               (0, 10 ** 6, 50, 49)])
def test_cohort_sorted_unique_in_range_and_reproducible(seed, round_, n, k):
    c = rng.cohort(seed, round_, n, k)
    assert c.dtype == np.int64 and c.shape == (k,)
    assert np.all(np.diff(c) > 0)                               # sorted and unique
    assert c.min() >= 0 and c.max() < n
    assert np.array_equal(c, rng.cohort(seed, round_, n, k))
    if k == n:
        assert c.tolist() == list(range(n))


def test_cohorts_vary_with_round_and_seed():
    by_round = {tuple(rng.cohort(0, r, 100, 10)) for r in range(1, 21)}
    assert len(by_round) == 20
    assert not np.array_equal(rng.cohort(0, 1, 100, 10), rng.cohort(1, 1, 100, 10))
    counts = np.bincount(np.concatenate([rng.cohort(0, r, 20, 5) for r in range(1, 401)]), minlength=20)
    assert np.all(counts > 50) and np.all(counts < 150), counts         # every agent gets sampled (~100)


def test_hash32_agrees_on_ints_numpy_and_torch():
    g = np.random.default_rng(0)
    xs = g.integers(0, 2 ** 32, size=200, dtype=np.int64)
    h_np = rng.hash32(xs)
    h_t = rng.hash32(torch.as_tensor(xs)).numpy()
    h_int = np.array([rng.hash32(int(x)) for x in xs], dtype=np.int64)
    assert np.array_equal(h_np, h_t) and np.array_equal(h_np, h_int)
    assert h_np.min() >= 0 and h_np.max() < 2 ** 32
    assert len(np.unique(h_np)) == 200


def test_key_mixes_every_part():
    assert rng.key(1, 2, 3) == rng.key(1, 2, 3)
    assert len({rng.key(1, 2, 3), rng.key(3, 2, 1), rng.key(1, 2), rng.key(1, 2, 3 + 2 ** 32), rng.key(1, 2, 4)}) == 5
    assert 0 <= rng.key(2 ** 100 + 5) < 2 ** 32
