"""The math: the ν-step meta-gradient, its loss, flat models, exact sums, counter-based randomness."""
