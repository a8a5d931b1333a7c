"""ε of a DP run after r rounds, with Google's ``dp-accounting`` (never by hand).

- Poisson sampling (each training agent joins a round independently with probability q = m/N):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add/remove-one, with the RDP or the PLD
  accountant.
- Fixed-size cohorts (m of N without replacement): ``SampledWithoutReplacementDpEvent(N, m,
  GaussianDpEvent(z/2))`` under replace-one, as that library requires (RDP only). The clipped sum's
  L2 sensitivity under replace-one is 2C, so the noise multiplier relative to it is z/2.

ε is composed round by round (:class:`Ledger`): a resumed run re-composes the rounds before its
checkpoint one by one, so its ε equals the straight run's.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from mpifedmeta.errors import ConfigError
from mpifedmeta.privacy.mechanism import PrivacySpec

MAX_NOISE_MULTIPLIER = 100.0
SUPPORTED = {("poisson", "rdp"), ("poisson", "pld"), ("fixed", "rdp")}


PLD_DISCRETIZATION = 1e-3     # the PLD's loss grid: ~10x faster than the library's 1e-4 for ε within 0.02%
                              # (measured: 0.06-0.09 s a round instead of 0.4-1.2 s); its rounding is pessimistic


def _lib():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("privacy.clip is set but the dp-accounting package is missing: "
                          "pip install -e '.[dp]' (or pip install dp-accounting)") from None
    logging.getLogger("absl").setLevel(logging.ERROR)   # RDP orders it cannot evaluate: one warning each, per call
    return dp_accounting


def check(sampling: str, accountant: str) -> None:
    if (sampling, accountant) not in SUPPORTED:
        raise ConfigError(f"privacy.accountant = {accountant!r} with privacy.sampling = {sampling!r}: not supported "
                          "(dp-accounting's PLD accountant has no fixed-size sampling under replace-one; use rdp)")


def event(spec: PrivacySpec, z: float | None = None):
    """The DpEvent of one round."""
    dp = _lib()
    z = spec.noise_multiplier if z is None else z
    if spec.sampling == "poisson":
        return dp.PoissonSampledDpEvent(spec.q, dp.GaussianDpEvent(z))
    return dp.SampledWithoutReplacementDpEvent(spec.num_train, spec.agents_per_round, dp.GaussianDpEvent(z / 2))


def fresh(spec: PrivacySpec):
    """An empty accountant of the spec's kind and neighbouring relation."""
    dp = _lib()
    relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE if spec.sampling == "poisson" else \
        dp.NeighboringRelation.REPLACE_ONE
    if spec.accountant == "pld":
        return dp.pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    return dp.rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(spec: PrivacySpec, rounds: int, z: float | None = None) -> float:
    """ε after ``rounds`` rounds (composed at once; :class:`Ledger` composes round by round)."""
    if (spec.noise_multiplier if z is None else z) == 0:
        return math.inf
    acc = fresh(spec)
    acc.compose(event(spec, z), rounds)
    return float(acc.get_epsilon(spec.delta))


def calibrate(spec: PrivacySpec, target_epsilon: float, rounds: int) -> float:
    """The smallest noise multiplier z whose ε after ``rounds`` rounds is ≤ ``target_epsilon`` (within
    the library's tolerance: ε ≥ 95% of the target); ConfigError when z would exceed 100.

    PLD is calibrated inside a bracket found with RDP (an upper bound on ε, so RDP's z is an upper
    bound on PLD's): PLD at a tiny z would discretize an enormous privacy loss (tens of GB)."""
    dp = _lib()
    if epsilon(spec, rounds, MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon}: not reachable in {rounds} rounds with a noise "
                          f"multiplier up to {MAX_NOISE_MULTIPLIER:g} (fewer rounds, a smaller cohort or a larger ε)")
    tol = 1e-4 * max(1.0, target_epsilon)
    rdp = dataclasses.replace(spec, accountant="rdp")

    def solve(s: PrivacySpec, bracket) -> float:
        return float(dp.calibrate_dp_mechanism(lambda: fresh(s), lambda z: dp.SelfComposedDpEvent(event(s, z), rounds),
                                               target_epsilon, s.delta, bracket, tol=tol))

    z = solve(rdp, dp.LowerEndpointAndGuess(1e-3, 1.0))
    if spec.accountant == "rdp":
        return z
    low = 0.5 * z
    while low > 0.05 * z and epsilon(spec, rounds, low) <= target_epsilon:
        low *= 0.5
    return solve(spec, dp.ExplicitBracketInterval(low, z))


class Ledger:
    """ε round after round: ``advance()`` composes one more round and returns ε at δ."""

    def __init__(self, spec: PrivacySpec, start_round: int = 0):
        self.spec, self.rounds = spec, 0
        self.acc = None if spec.noise_multiplier == 0 else fresh(spec)
        self.one = None if self.acc is None else event(spec)
        for _ in range(start_round):
            self.advance()

    def advance(self) -> float:
        self.rounds += 1
        if self.acc is None:
            return math.inf
        self.acc.compose(self.one)
        return float(self.acc.get_epsilon(self.spec.delta))
