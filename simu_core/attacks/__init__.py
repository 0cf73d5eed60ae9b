"""Attacks on an unlearned model (see simu_core.attacks.registry)."""
