"""Differential privacy (DP-FedAvg, McMahan et al., ICLR 2018) as a stage of the round.

- :mod:`mechanism` — the Gaussian mechanism on the agents' updates: each update clipped in the batched
  pass (torch), the noise drawn once per round in float64 from a counter-based stream keyed on
  (seed, round) — identical on every rank, so a DP run is bit-identical for any number of ranks.
- :mod:`accountant` — ε after r rounds at δ with Google's ``dp-accounting`` (RDP or PLD), and the
  calibration of the noise multiplier to a target ε.
"""

from mpifedmeta.privacy.mechanism import PrivacySpec

__all__ = ["PrivacySpec"]
