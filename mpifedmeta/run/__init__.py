"""The run machinery: configuration, set-up, the round loop, signals, sweeps, the terminal."""
