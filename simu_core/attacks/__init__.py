"""Attacks on an unlearned model: one module each; their names and stages in :mod:`simu_core.attacks.names`."""
