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
