"""The one error boundary every `loopmdm` command runs inside.

Whatever the user can cause ends as one line `error: ...` on stderr and exit status 2:
- a `LoopMDMError` (a bad value, a missing checkpoint, an empty corpus) prints its message;
- any `OSError` that reached the top (a full disk, a folder where a file was expected, no
  permission, a path under a file) prints the path and what went wrong;
- a command-line syntax error (argparse) is one line too, with a pointer to `--help`.
Bugs (any other exception) still show their traceback: they are ours to fix, not the user's.
Torch-free.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys

from loopmdm.errors import LoopMDMError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_INT = 2**31


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one `error:` line (argparse prints the usage and a
    `prog: error:` line); sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {one_line(message)} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        """No integer option (a count, a size or a seed) is huge (>= 2^31: nothing that large can
        run), no seed is negative, every float option is finite. Commands check their own lower
        bounds (>= 0, >= 1)."""
        namespace, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            name = "/".join(action.option_strings) or action.dest
            if action.type is int and isinstance(value, int) and not abs(value) < MAX_INT:
                self.error(f"argument {name}: {value} is too large; it must be below {MAX_INT}")
            if action.dest == "seed" and isinstance(value, int) and value < 0:  # numpy seeds are >= 0
                self.error(f"argument {name}: {value} must be an integer >= 0")
            if action.type is float and isinstance(value, float) and not math.isfinite(value):
                self.error(f"argument {name}: {value} must be a finite number")
        return namespace, extra


def one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).strip()


def os_error_line(exc: OSError) -> str:
    """An OSError as one line naming the path (or paths) it is about."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(f"'{p}'" for p in paths)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"disk full while writing {where or 'a file'} (OSError {code}); free some space and run the "
                f"command again")
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.EISDIR: "a folder where a file was expected", errno.ENOTDIR: "a file where a folder was expected",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
            errno.EROFS: "choose a writable location", errno.EEXIST: "choose a new name"}.get(exc.errno)
    return (f"{where}: " if where else "") + what + (f" (OSError {code}" + (f": {hint})" if hint else ")") if code else "")


def run_command(func, args) -> int:
    """Run `func(args)`; the exit status, with every user-caused failure as one line."""
    try:
        func(args)
    except LoopMDMError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"error: {one_line(os_error_line(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
