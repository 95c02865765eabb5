"""User-facing errors: one line naming the file, record, key or value at fault, exit status 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, data, paths). Printed as one line, never a traceback."""


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

    return wrapper


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
