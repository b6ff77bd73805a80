"""How qcompile, qrun and qeval fail: one line on stderr that says what went wrong and what
to do, and an exit status (2: bad input, 130: interrupted), never a traceback for a user's
mistake. An unexpected exception (a bug) is one line too, naming the exception and how to see
its traceback (QCOMPILE_TRACEBACK=1)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# The errors a user can cause and fix: bad flags or values, missing or corrupt files,
# an unusable device, a model that does not fit.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`prog: error: ... (see prog --help)`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(prog: str, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run `body`, turning every exception into one line on stderr and an exit status."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("QCOMPILE_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, with the way to the traceback
        if os.environ.get("QCOMPILE_TRACEBACK"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (a bug: please report "
              "it; QCOMPILE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
