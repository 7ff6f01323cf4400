"""The errors a user can cause, and the one boundary the CLI prints them through.

Every error a user can fix (a damaged or mismatched model, an unreadable or wrong-model plan, a text too short, an
output location that is read-only or full, a bad recipe) is a `UserError`: its message names the file, what is wrong
and the fix, and the CLI prints it as one `error:` paragraph with exit code 2, no traceback. The project's error
classes derive from it where they are defined (ModelDirError, OutputExists, InfeasibleBudget, UnsupportedArchitecture,
TargetError, RecipeError, ...); anything else that escapes is a bug and keeps its traceback. This module imports
nothing of the package, so every package (the pure ones too) may import it.
"""

from __future__ import annotations

import errno
import os
import re

EXCERPT_CHARS = 80  # the most of a user's input an error message quotes


class UserError(Exception):
    """An error in what the user gave (files, flags, recipe) or in the environment (disk full, read-only output):
    the message says what is wrong and how to fix it."""


class MissingFile(UserError, FileNotFoundError):
    """A file named on the command line or in a recipe does not exist."""


class TextError(UserError, ValueError):
    """A calibration or evaluation text that is empty or too short for what was asked of it."""


class PlanError(UserError, ValueError):
    """A --plan file that is not a plan, names formats that do not exist, or was made for another model."""


class OutputError(UserError):
    """An output location that cannot be written (read-only, not a directory, no space left)."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class NonFiniteError(UserError, ValueError):
    """NaN or inf in a model's weights or activations: the checkpoint is damaged (or the model overflows)."""


class SettingError(UserError, ValueError):
    """A flag or recipe value the command cannot work with (a window of 0 tokens, a batch of none)."""


# USER_ERRORS: what cli.py prints as `error:` (kept as a tuple for callers that catch it)
USER_ERRORS = (UserError,)

# OS errors that are the environment's, not a bug: errno -> what to do about it
OS_FIXES = {
    errno.ENOSPC: "free space on that file system, or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free space, or write somewhere else",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f): raise the limit, or write somewhere else",
    errno.EROFS: "that file system is read-only: choose a writable location",
    errno.EACCES: "check the permissions of that path, or choose another location",
    errno.EPERM: "check the permissions of that path, or choose another location",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another location",
    errno.EISDIR: "that path is a directory where a file was expected",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the storage reported an I/O error: check the disk",
}

_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind `err` (itself, or safetensors' SafetensorError 'I/O error: ... (os error 28)', which carries
    only the text), when it is one the environment causes (OS_FIXES); None otherwise."""
    if isinstance(err, OSError) and not isinstance(err, UserError):
        return err if err.errno in OS_FIXES else None
    if type(err).__name__ == "SafetensorError":
        m = _OS_ERROR_CODE.search(str(err))
        if m and int(m.group(1)) in OS_FIXES:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def environment_error(err: BaseException, where: str = "") -> OutputError | None:
    """`err` as an OutputError naming the path and the fix, when it is an environment's OS error (os_error_of);
    `where`: the path, when the error does not carry it (safetensors' errors do not)."""
    os_err = os_error_of(err)
    if os_err is None:
        return None
    where = os_err.filename or where or "a file"
    action = "cannot write" if os_err.errno in WRITE_ERRORS else "cannot access"
    return OutputError(f"{action} {where}: {os_err.strerror}; {OS_FIXES[os_err.errno]}", os_err.errno)


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """repr(value), cut to `limit` characters: what a message may quote of a user's input."""
    return shorten(repr(value), limit)
