"""Runs that stop half-way leave nothing behind but resumable work, and say so: a compress killed with SIGKILL after
its first journaled layer resumes to the tensors of an uninterrupted run and its temporary directory is cleaned by
the rerun; a write that fails for lack of space keeps the journal (and says how to resume), nothing else; a dead
process's temporary directories are removed or put back. And the error boundary itself: an unexpected error is a
bug (traceback, exit 1), an interrupt exits 130, an OS error of the environment from any command is an error line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from compressor import api
from compressor.pipeline import pass1
from compressor.io.checkpoint import read_tensors
from compressor.io.outputs import remove_stale
from tiny import save_tiny

# cli.main with pass 2 held at decoder layer 1, so that a test can kill the process once layer 0 is journaled
HELD_AT_LAYER_1 = """
import sys, time
from compressor.apply_plan import QuantizePass
real = QuantizePass.__call__
def held(self, i, layer, inputs):
    if i == 1:
        time.sleep(600)
    return real(self, i, layer, inputs)
QuantizePass.__call__ = held
import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("m"))


def argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", str(src), "--output", str(out), "--calib", str(src / "calib.txt"), "--samples", "4",
            "--seq-len", "32", "--group-size", "32", *extra]


def beside(out: Path) -> list[str]:
    """What lies beside `out` besides it: temporary directories, journals."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and p.name.startswith(f".{out.name}."))


def same_tensors(a: Path, b: Path) -> bool:
    x, y = read_tensors(a), read_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_kill_9_after_the_first_journaled_layer_then_rerun(src, tmp_path, capsys):
    clean = tmp_path / "clean"
    assert cli.main(argv(src, clean)) == 0  # GPTQ: layer 1's inputs come from the quantized layer 0
    out = tmp_path / "out" / "o"
    proc = subprocess.Popen([sys.executable, "-c", HELD_AT_LAYER_1, *argv(src, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out.parent / ".o.partial" / "layer-0.safetensors"  # appears whole (written beside, then renamed)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the process journaled layer 0 before it was killed"
    assert beside(out) == [".o.partial", f".o.tmp-{proc.pid}"]
    capsys.readouterr()
    assert cli.main(argv(src, out)) == 0
    assert f"removed {out.parent / f'.o.tmp-{proc.pid}'}" in capsys.readouterr().out
    assert same_tensors(out, clean)
    assert [r["resumed"] for r in json.loads((out / "report.json").read_text())["layers"]] == [True, False]
    assert beside(out) == [], "no stale temporary directory, the journal removed once the output is committed"


def test_a_full_disk_keeps_only_the_journal_and_the_rerun_resumes(src, tmp_path, capsys, monkeypatch):
    """The disk fills up while the output's model.safetensors is written (safetensors' own error, which names no
    file): the error names the file, the temporary output is removed, the journal of finished layers is kept and the
    log says how to resume; the rerun does, to the tensors of an uninterrupted run."""
    from safetensors import SafetensorError

    import compressor.io.keyed as keyed

    out, extra, real = tmp_path / "o", ("--method", "rtn", "--bits", "8"), keyed.save_file

    def disk_full(tensors, path, metadata=None):
        if Path(path).name == "model.safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(keyed, "save_file", disk_full)
    capsys.readouterr()
    assert cli.main(argv(src, out, *extra)) == 2
    logged = capsys.readouterr()
    message = logged.err[logged.err.index("error: "):]  # after the progress bars
    assert "Traceback" not in logged.err and message.startswith(f"error: cannot write {tmp_path}/.o.tmp-")
    assert message.endswith("/model.safetensors: No space left on device; free space on that file system, or write "
                               "somewhere else\n")
    assert "2 finished layer(s)" in logged.out and f"kept in {tmp_path / '.o.partial'}; once the error" in logged.out
    assert not out.exists() and beside(out) == [".o.partial"]
    monkeypatch.setattr(keyed, "save_file", real)
    assert cli.main(argv(src, out, *extra)) == 0
    assert "pass 2: resuming, 2 layer(s)" in capsys.readouterr().out
    assert cli.main(argv(src, tmp_path / "clean", *extra)) == 0
    assert same_tensors(out, tmp_path / "clean") and beside(out) == []


def test_temporary_directories_of_dead_processes(tmp_path):
    out, dead = tmp_path / "o", dead_pid()
    (tmp_path / f".o.tmp-{dead}").mkdir()
    (tmp_path / f".o.tmp-{os.getpid()}").mkdir()  # a live process's: left alone
    (tmp_path / f".o.old-{dead}").mkdir()  # killed between the two renames of a commit: the previous output
    (tmp_path / f".o.old-{dead}" / "model.safetensors").write_text("previous")
    remove_stale(out, log=lambda *_: None)
    assert (out / "model.safetensors").read_text() == "previous", "put back, not deleted"
    assert beside(out) == [f".o.tmp-{os.getpid()}"]


def test_an_unexpected_error_is_a_bug_with_its_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(api, "inspect_model", broken)
    assert cli.main(["inspect"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something inside broke" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError): this is a bug in moe-compressor")


def test_os_errors_of_the_environment_from_any_command(monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.safetensors")

    monkeypatch.setattr(api, "inspect_model", full)
    assert cli.main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: cannot write /data/out/x.safetensors: No space left on device; free space on that file "
                   "system, or write somewhere else\n")


def test_an_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect_model", interrupted)
    assert cli.main(["inspect"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_budget_line_counts_what_the_budget_counts(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pass1, "MEASUREMENTS_DIR", tmp_path / "cache")  # where make_plan reads it
    assert cli.main(argv(src, tmp_path / "o", "--dry-run", "--budget", "4bits", "--budget-scope", "experts")) == 0
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    counted, total = plan["allocation"]["budget_counts"], plan["predicted_bytes"]
    assert counted <= plan["budget_bytes"] < total
    line = f"routed experts {counted:,} bytes, budget {plan['budget_bytes']:,} (scope experts); checkpoint {total:,} " \
           "bytes in all"
    assert line in capsys.readouterr().out
