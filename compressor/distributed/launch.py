"""`cli.py compress` when launched as one rank of several (torchrun sets WORLD_SIZE, RANK, MASTER_ADDR, ...)."""

from __future__ import annotations

from pathlib import Path

from .driver import RankDriver


def compress_as_rank(recipe, overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False) -> Path:
    """api.compress on this rank; rank 0 logs and writes. Whatever stops this rank is posted for the others (they
    stop too, naming it), and the process group is closed."""
    from .. import api

    driver = RankDriver(recipe)
    log = print if driver.is_lead else (lambda *_: None)
    try:
        out = api.compress(recipe, overwrite, trust_remote_code, dry_run, log=log, driver=driver)
    except BaseException as err:
        driver.close(err)
        raise
    driver.close()
    return out
