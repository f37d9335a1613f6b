"""The demo's errors: each is reported as one line on stderr with exit code 2."""


class UsageError(Exception):
    """Bad input to the demo (options, prompt, device, dtype), with a one-line message naming the problem."""


class ModelError(ValueError):
    """A model that cannot be used, with a one-line message that names the problem."""
