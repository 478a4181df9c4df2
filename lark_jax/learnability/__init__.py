"""Per-token learnability statistics, per-trajectory reduction, g_hat, the scoring runner."""
