"""One exception type for every user-facing failure, so the CLI can print it cleanly."""


class MudscError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""
