"""The tier report: per-path log-likelihood, tier ordering and expert load of any MoE checkpoint."""
