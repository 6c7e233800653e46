"""The one exception type a user is meant to see.

Everything a user can cause (a bad path, an offline hub id, an impossible sparsity) is
raised as :class:`SdspruneError` with a message that says what to do; the CLI prints it on
one line and exits non-zero instead of showing a traceback from deep inside torch.
"""


class SdspruneError(Exception):
    """A problem with the user's input or environment, with an actionable message."""
