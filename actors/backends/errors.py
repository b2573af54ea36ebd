"""The backends' error, in a module without torch: the driver checks a backend before any actor starts
and must not pay torch's import for it."""


class BackendError(RuntimeError):
    """A backend that cannot run here, or cannot do what a row asks; the message says what would."""
