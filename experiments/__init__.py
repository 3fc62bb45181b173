"""Research studies built on msplora_dist, run from the repository root as modules
(`python -m experiments.quality.smoke`); not shipped in the wheel."""
