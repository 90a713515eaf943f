"""Where the code runs: device and CPU mode, process groups, Slurm, signals, RNG streams, downloads."""
