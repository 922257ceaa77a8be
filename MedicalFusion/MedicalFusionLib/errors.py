"""User-facing errors.

Every problem a user can cause (bad file, bad geometry, unknown method...) is raised as a
:class:`FusionError` whose message is one line that says what to do. The CLI prints it without a
traceback; the Slicer panel shows it in a message box.
"""


class FusionError(ValueError):
    """A problem with the user's input or settings; the message is one actionable line."""


class FusionCancelled(RuntimeError):
    """Raised by the engine when the cancel check returns True between batches."""
