"""``ordmoe-sweep``: seeded grids of OrdMoE settings against plain top-K baselines (sweep/cli.py)."""
