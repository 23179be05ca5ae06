"""Errors a user can fix by changing what they typed.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input (missing file, bad model folder, empty prompt, ...).

    The message must fit on one line and say what is wrong and what to do about it.
    """


class OutOfDomainError(UserError):
    """A face the model's card says the model was not made for (the in-domain check refused it).

    ``str()`` is the card's one line for the command line; the fields let another front end (the
    web page, which has no flags) word the refusal its own way.
    """

    def __init__(self, message: str, *, label: str, model_name: str, description: str, score: float, threshold: float):
        super().__init__(message)
        self.label = label  # the face, e.g. "face 0 of interview.mp4"
        self.model_name = model_name
        self.description = description  # what the model edits, e.g. "FaceWorld's drawn faces"
        self.score = score
        self.threshold = threshold
