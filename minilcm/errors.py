"""What the user can fix, and how the command line reports it.

    UserError            base of every error whose message names the fix (a missing checkpoint, a bad flag, a
                         corrupt archive, ...). ``minilcm`` prints it on stderr in at most three lines and exits
                         with code 2; ``MINILCM_DEBUG=1`` (or ``minilcm --debug``) shows the traceback instead.
    TrainingInterrupted  SIGINT / SIGTERM during ``minilcm.train.train``: the checkpoint is saved and consistent;
                         the CLI prints "stopped at step N of M; rerun the same command to resume" and exits
                         130 (SIGINT) or 143 (SIGTERM).

Python callers get the same exceptions: ``CheckpointError``, ``CifarUnavailable``, ``DataError`` and
``TeacherError`` are UserErrors (and keep their old bases, RuntimeError / ValueError).
"""
from __future__ import annotations

import os


class UserError(Exception):
    """An error the user can fix; its message says how."""


class InputError(UserError, ValueError):
    """A value the user passed (a flag, an argument) is impossible: the message names the valid range."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a consistent checkpoint was written (or none was asked for)."""

    def __init__(self, step: int, total: int, signum: int, saved_to=None):
        self.step, self.total, self.signum, self.saved_to = step, total, signum, saved_to
        how = ("rerun the same command to resume" if saved_to is not None
               else "no checkpoint folder was set, so nothing was saved")
        super().__init__(f"stopped at step {step} of {total}; {how}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def debug() -> bool:
    """True when tracebacks are wanted: $MINILCM_DEBUG set to anything but '', '0' or 'false'."""
    return os.environ.get("MINILCM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException, width: int = 160, with_type: bool = False) -> str:
    """An exception as one line: its first non-empty line, cut to ``width`` characters ("..." marks a cut),
    prefixed with the exception's class when ``with_type``; the class name alone when the message is empty."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "").rstrip(":")
    text = text if len(text) <= width else text[:width - 3].rstrip() + "..."
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text


def short(e: BaseException, max_lines: int = 3) -> str:
    """An exception's message, at most ``max_lines`` lines (the rest is what --debug shows)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[-1]]
    return "\n".join(lines)
