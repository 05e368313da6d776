"""User-facing errors: one exception type whose message names the problem and the fix."""


class PowerlowError(Exception):
    """A problem the user can fix (bad path, bad config value, corrupt file, ...).

    The CLI prints the message and exits with status 2; library callers can catch it.
    """


class BudgetTooSmall(PowerlowError):
    """The memory budget is below what the plan needs; ``minimum`` is the smallest it accepts (bytes)."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = int(minimum)


class NotBuiltError(PowerlowError, ImportError):
    """powerlow's compiled extensions (_kernels, _iocore) cannot be imported: the package was not built."""


def not_built(e: ImportError) -> NotBuiltError:
    """The error for a failed import of a compiled extension: what failed and how to build it."""
    return NotBuiltError(
        f"powerlow's compiled extensions are not built or do not load ({e}): install the package with "
        "`pip install .` (it compiles them), or, to run from a source tree, build them in place with "
        "`pip install -e .` or `python setup.py build_ext --inplace`")
