"""Merge methods, one module each; importing this package registers them all."""

from merge_core.methods import (  # noqa: F401
    average,
    breadcrumbs,
    dare,
    della,
    extreme,
    iso_c,
    iso_cts,
    model_stock,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
