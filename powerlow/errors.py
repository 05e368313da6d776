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


def extension(name: str):
    """The compiled extension ``name`` (_kernels, _iocore) of this package, or NotBuiltError saying what failed
    and how to build it (relative to this package, so a tree imported under another name gets its own)."""
    import importlib
    try:
        return importlib.import_module("." + name, __package__)
    except ImportError as e:
        raise NotBuiltError(
            f"powerlow's compiled extensions are not built or do not load ({e}): install the package with "
            "`pip install .` (it compiles them), or, to run from a source tree, build them in place with "
            "`pip install -e .` or `python setup.py build_ext --inplace`") from e
