"""Command-line handling shared by the Hydra scripts of ``nemo_merge``."""

from __future__ import annotations

from pathlib import Path


def config_path_from_cwd(argv: list[str]) -> list[str]:
    """``argv`` with a relative ``--config-path``/``-cp`` made absolute from the working
    directory, where users give it (as with NeMo's example scripts run from the repo);
    Hydra would read it from the script module's folder."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-path", "-cp") and eq and value and not Path(value).is_absolute():
            out[i] = f"{flag}={Path(value).resolve()}"
        elif arg in ("--config-path", "-cp") and i + 1 < len(out) and not Path(out[i + 1]).is_absolute():
            out[i + 1] = str(Path(out[i + 1]).resolve())
    return out
