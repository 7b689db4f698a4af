"""Measuring: long-context tasks, metrics, and the runner (DESIGN 2.4, 3.4)."""
