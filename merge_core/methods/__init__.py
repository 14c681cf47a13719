"""Merge methods, one module each; importing this package registers them all."""

from merge_core.methods import average, dare, extreme, slerp, task_arithmetic, ties  # noqa: F401
