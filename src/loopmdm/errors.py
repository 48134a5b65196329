"""User-facing errors.

Anything the user can cause (a bad config value, a missing checkpoint, an empty corpus)
raises `LoopMDMError` with one readable line naming the bad value and what is allowed.
The CLI prints that line and exits with status 2 instead of showing a traceback.
"""


class LoopMDMError(Exception):
    """An error caused by user input; its message is a single line meant for the user."""


def require(condition: bool, message: str) -> None:
    """Raise `LoopMDMError(message)` unless `condition` holds."""
    if not condition:
        raise LoopMDMError(message)


def run_script(main) -> None:
    """Run a script's `main()` (benchmarks/) as the CLI runs a command and exit with what it
    returns (None: 0); a `LoopMDMError` is its one line on stderr and exit status 2, not a traceback."""
    import sys

    try:
        sys.exit(main())
    except LoopMDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
