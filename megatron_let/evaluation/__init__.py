"""Downstream evaluation (lm-evaluation-harness)."""
