"""Measuring: long-context tasks, metrics, and the runner (docs/evaluation.md)."""
