"""Toolkit chatter to a log file, the progress bar alone on the terminal.

NeMo and SpeechBrain log dozens of lines per model restored (data loaders never set up,
deprecations, sampling rates); interleaved with the evaluation's progress bar they hide
it. While :func:`toolkit_output_to` is active, every log handler that writes to the
terminal writes to a log file instead, as do ``print`` and Python warnings; the progress
bar, created beforehand, keeps the terminal. Handlers are redirected rather than
silenced because toolkits reset their levels (NeMo's ``transcribe`` does).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator


def _terminal_handlers() -> list[logging.StreamHandler]:
    """Every handler holding a terminal stream, on the root logger or any other (handlers
    that look ``sys.stderr`` up at each record follow the redirection by themselves)."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return [
        h for x in loggers for h in x.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(getattr(type(h), "stream", None), property)
        and h.stream in terminal
    ]


@contextlib.contextmanager
def toolkit_output_to(log_file: Path) -> Iterator[Path]:
    """Within the block, log records, prints and warnings go to ``log_file`` (appended).
    Call it once the toolkit is imported, so that its handlers exist to be redirected."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log, contextlib.ExitStack() as restore:
        for handler in _terminal_handlers():
            previous = handler.setStream(log)
            restore.callback(handler.setStream, previous)
        # records with no handler of their own (Python warnings among them) reach the root's
        to_file = logging.StreamHandler(log)
        logging.getLogger().addHandler(to_file)
        restore.callback(logging.getLogger().removeHandler, to_file)
        logging.captureWarnings(True)
        restore.callback(logging.captureWarnings, False)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log_file
