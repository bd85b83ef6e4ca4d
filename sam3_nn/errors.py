"""The errors that mean "what was given is wrong", as opposed to a bug.

Every such error of the package derives from :class:`UserError` (``LibraryError``,
``InputError``, ``TokenizerError``, ``CheckpointError``, ``DeviceError``...): its message says
what was wrong and what was expected, and a command prints it without a traceback. Here, with
nothing imported, so that every part of the package can derive from it.
"""


class UserError(ValueError):
    """An input, file or setting the user gave cannot be used; the message says why."""


class InputError(UserError):
    """An image, prompt, box, threshold or output path the model or command cannot take."""
