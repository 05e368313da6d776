"""User-facing errors: one exception type whose message names the problem and the fix."""


class PowerlowError(Exception):
    """A problem the user can fix (bad path, bad config value, corrupt file, ...).

    The CLI prints the message and exits with status 2; library callers can catch it.
    """
