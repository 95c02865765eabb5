"""User-facing errors: one line naming the file, record, key or value at fault, exit status 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable

from core.parent_watch import stop_watching, watch_parent


class UserError(Exception):
    """Bad input from the user (config, data, paths). Printed as one line, never a traceback."""


class RankFailed(Exception):
    """An unexpected error on one rank of a multi-process run (raised from it, `__cause__`): one
    line naming the rank instead of every rank's traceback interleaved (exit status 1)."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}")
        self.rank, self.error = rank, error


def one_line(err: BaseException) -> str:
    """The message of a UserError as the user should see it. A DataLoader worker re-raises it as
    `UserError("Caught UserError in DataLoader worker ...\nOriginal Traceback ...\n<module>.UserError: <msg>")`:
    keep only the original message."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def cli_main(main: Callable[[list[str]], object]) -> Callable[[list[str] | None], None]:
    """Wrap a CLI ``main(argv)``: UserError -> one line on stderr and exit 2 (traceback with --debug)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> None:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        quiet_lightning_tips()
        watch_parent()  # a rank Lightning's launcher started leaves if its rank 0 is killed (core/parent_watch.py)
        try:
            main(argv)
        except UserError as err:
            if debug:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:
            # `... | head` closed the pipe: stop quietly, as Unix tools do (and silence the flush at exit).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except Exception as err:  # noqa: BLE001 -- only on a rank of a multi-process run; else re-raised
            rank = err.rank if isinstance(err, RankFailed) else distributed_rank()
            if debug and isinstance(err, RankFailed):
                raise err.error from None
            if debug or rank is None:
                raise
            err = err.error if isinstance(err, RankFailed) else err
            # Each rank prints its own traceback otherwise, interleaved with the others': one line
            # each, the failing rank's an error; the ranks it left waiting say why they stopped.
            first = (str(err).strip().splitlines() or [""])[0][:300]
            if is_peer_failure(err):
                print(f"rank {rank} stopped: another rank failed or stopped answering ({type(err).__name__}: "
                      f"{first})", file=sys.stderr)
            else:
                print(f"error: rank {rank}: {type(err).__name__}: {first} (--debug shows the traceback)",
                      file=sys.stderr)
            sys.exit(1)
        finally:
            stop_watching()

    return wrapper


def distributed_rank() -> int | None:
    """This process's global rank in a run of several processes (torch.distributed, torchrun,
    SLURM or Lightning's own DDP launcher); None in a single-process run."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank()
    except ImportError:
        pass
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or 0)
    return None


# What a rank sees when another rank died (gloo, NCCL) or hung past the collective's timeout.
_PEER_FAILURES = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                  "communicator was aborted", "broken pipe", "socket", "process group")


def is_peer_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return type(err).__name__ == "DistBackendError" or any(s in text for s in _PEER_FAILURES)


class _NoPromotionalTips(logging.Filter):
    """Lightning logs "💡 Tip: try installing ..." advertisements at INFO on every Trainer; our
    output carries results, not adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in str(record.msg)


def quiet_lightning_tips() -> None:
    """No adverts, and no warning about Lightning's own use of a torch deprecation (not the user's to fix)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoPromotionalTips) for f in logger.filters):
        logger.addFilter(_NoPromotionalTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
