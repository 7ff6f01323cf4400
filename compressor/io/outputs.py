"""Output locations: checked before the long work, and nothing left behind after it.

- `check_writable` and `check_space`: an output whose location is read-only, not a directory or too small for what
  the run will write is refused before pass 1 (writable) and before pass 2 (space), not when the first file fails.
- `remove_stale`: the temporary outputs (directories, or an export's files) a killed process left beside an output
  (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) or in a journal (`.<file>.<pid>.tmp`) are removed by the next run when
  that process is dead; an `.old-<pid>` whose output is missing (a kill between the two renames of a commit) is put
  back first.
- `after_failure`: a journal (io/journal.py) is kept after a failure only when it holds finished layers that a rerun
  can use (an interrupt, a full disk, a setting refused after pass 2: the log says so and how to resume); when the
  input model is damaged (NaN weights, a bad checkpoint) or nothing was finished, it is removed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import NonFiniteError, OutputError, environment_error
from .models import ModelDirError

INPUT_DAMAGE = (NonFiniteError, ModelDirError)  # failures after which a journal of the same model is of no use


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out_dir: Path) -> None:
    """Can `out_dir` (and its temporary siblings) be created? Probed with a file in its nearest existing ancestor,
    removed at once."""
    out_dir = Path(out_dir).absolute()
    where = existing_ancestor(out_dir.parent)
    if not where.is_dir():
        raise OutputError(f"cannot create {out_dir}: {where} is a file, not a directory; choose another --output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-compressor-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = OSError(err.errno, err.strerror)  # not the probe's name: the directory's
        raise environment_error(reason, f"{out_dir} (in {where})") or OutputError(f"cannot write in {where}: {err}") \
            from None


def check_space(out_dir: Path, need: int, what: str) -> None:
    """At least `need` bytes free where `out_dir` goes (`what` says what they are for)."""
    where = existing_ancestor(Path(out_dir).parent)
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(f"not enough space for {out_dir}: {what} need {need:,} bytes, {where} has {free:,} free; free "
                          "space or choose another --output", errno.ENOSPC)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out_dir: Path, log=print) -> None:
    """The temporary directories of dead processes beside `out_dir` (checkpoint.prepare_output / commit_output)."""
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)$")
    for p in sorted(out_dir.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out_dir.exists():
            p.rename(out_dir)  # killed between moving the old output aside and moving the new one in
            log(f"restored {out_dir} from {p.name}, left by a killed run")
        else:
            remove_path(p)
            log(f"removed {p}, left by a killed run (process {m.group(2)})")


def remove_path(path: Path) -> None:
    """A directory with its contents, or a file (an export's output is a file)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_files(directory: Path) -> None:
    """`.<name>.<pid>.tmp` files (io/keyed.py's atomic writes) of dead processes in `directory`."""
    if not Path(directory).is_dir():
        return
    pattern = re.compile(r"^\..+\.(\d+)\.tmp$")
    for p in Path(directory).iterdir():
        m = pattern.match(p.name)
        if m and p.is_file() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def after_failure(err: BaseException, journal_dir: Path, log=print) -> None:
    """Keep `journal_dir` after the failure `err` only if it holds finished layers and `err` does not say the input
    model is damaged (a fixed model is another model: its run would discard the journal); say so, with how to resume.
    Else remove it."""
    journal_dir = Path(journal_dir)
    layers = sorted(journal_dir.glob("layer-*.safetensors")) if journal_dir.is_dir() else []
    if not layers or isinstance(err, INPUT_DAMAGE):
        shutil.rmtree(journal_dir, ignore_errors=True)
        return
    size = sum(p.stat().st_size for p in layers)
    first = "once the error below is fixed, " if isinstance(err, OutputError) or environment_error(err) else ""
    log(f"interrupted: {len(layers)} finished layer(s) ({size:,} bytes) kept in {journal_dir}; {first}a run with the "
        "same model, calibration and quantization settings resumes from them (delete that directory to start over)")


def write_plan_only(plan, out_dir: Path, model_dir: Path, overwrite: bool, log=print) -> None:
    """A dry run's output: a directory holding plan.json, written as a real output is (same rules, atomically)."""
    from .checkpoint import commit_output, prepare_output

    tmp = prepare_output(out_dir, model_dir, overwrite, log)
    try:
        plan.save(tmp / "plan.json")
        commit_output(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"dry run: plan written to {Path(out_dir) / 'plan.json'}")
