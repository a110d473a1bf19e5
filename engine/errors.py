"""One error type for everything a user can get wrong.

An EngineError's message names the problem and the fix; the command-line entry points print it
without a traceback and exit with status 2.
"""


class EngineError(Exception):
    """A user-facing error: bad input, a missing file, a model that does not fit."""


def run_cli(main) -> None:
    """Run `main()`; print an EngineError as one clear message instead of a traceback."""
    import sys

    try:
        main()
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
