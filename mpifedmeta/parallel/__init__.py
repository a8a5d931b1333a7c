"""The platform: MPI (the only place that imports mpi4py), devices, `mpifedmeta info`."""
