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


class SettingError(UserError):
    """A user mistake about one setting, raised below the front-ends, which each name a setting in
    their own words: the command line its flag, the web page its label, a batch manifest its column.

    ``template`` holds ``{setting}`` where the setting is named; ``setting`` is the field's name in
    :class:`~ipfacediff.settings.EditSettings` or :class:`~ipfacediff.settings.ModelSpec`. ``str()``
    is the command line's wording (the flag), so a front-end that does not reword it still says a
    complete line.
    """

    def __init__(self, setting: str, template: str):
        self.setting = setting
        self.template = template
        super().__init__(self.worded({}))

    def worded(self, names: dict[str, str]) -> str:
        """The line with the setting called ``names[setting]`` (else its command-line flag)."""
        name = names.get(self.setting) or "--" + self.setting.replace("_", "-")
        return self.template.replace("{setting}", name)


HALF_DTYPES = ("torch.float16", "float16")


class NonFiniteError(UserError):
    """A stage's output holds NaN or inf: float16's range overflowed (or the weights are broken).

    Raised where a stage's latents are kept (the inversion cache) or made into pictures (the
    decoder), so that what the arithmetic lost is neither stored for the next edit nor shown as
    a black or grey video: one line naming the stage and what to run instead.
    """

    def __init__(self, stage: str, dtype: object = None):
        self.stage = stage
        if dtype is None:
            fix = "in float16, run again with --dtype float32; in float32, the model's weights give NaN or inf"
        elif str(dtype) in HALF_DTYPES:
            fix = f"the model runs in {str(dtype).removeprefix('torch.')}, whose range it overflowed: "
            fix += "run again with --dtype float32"
        else:
            fix = f"the model gives NaN or inf even in {str(dtype).removeprefix('torch.')}: check its weights"
        super().__init__(f"{stage} gave values that are not finite (NaN or inf); {fix}")

    @classmethod
    def check(cls, tensor, stage: str, dtype: object = None) -> None:
        """Raise for ``tensor`` (a torch tensor) with any NaN or inf: one pass over it, at a stage's end."""
        if not bool(tensor.isfinite().all()):
            raise cls(stage, dtype)
