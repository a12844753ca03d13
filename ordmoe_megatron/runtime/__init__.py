"""Megatron set-up that knows nothing of OrdMoE: process bootstrap, bridges, version differences, checkpoints,
model flags, outputs."""
