"""Errors a user can fix by changing what they typed.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input (missing file, bad model folder, empty prompt, ...).

    The message must fit on one line and say what is wrong and what to do about it.
    """
