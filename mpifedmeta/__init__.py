"""mpifedmeta: generalized (nu-step) meta federated learning, batched over agents, distributed with MPI."""

__version__ = "0.1.0"
