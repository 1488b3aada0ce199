"""Exception type for everything that can be wrong with a checkpoint directory.

One class (rather than ValueError/KeyError/OSError mixed) lets the server turn any bad checkpoint into a single
clear start-up failure, and lets tests assert on it.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint directory is missing, corrupt or does not match the architecture.

    The message always names the offending file and, where there is one, the tensor key.
    """
