"""User-facing errors that the core and the method packages share.

Each is a ``ValueError`` whose message says what is wrong and how to fix it (the command line shows it as one
``error: ...`` line with exit code 2).
"""


class CustomizationError(ValueError):
    """A problem with a customization input: reference images (:mod:`conceptsmith.images`), new tokens
    (:mod:`conceptsmith.tokens`) or a method's own inputs (:mod:`conceptsmith.customization` re-exports it)."""


class EditError(ValueError):
    """A user-facing problem with an Edit; the message names the file or module, the problem and the fix
    (:mod:`conceptsmith.edits` re-exports it)."""
