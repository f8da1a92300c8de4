"""Errors a user can act on.

Every error raised for bad input derives from `UserError`: the CLI prints its message as one line
and exits with its `exit_code`, never with a traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class AdapterError(UserError):
    """A missing, corrupt, truncated or mismatched adapter folder."""


class DataError(UserError):
    """Malformed or empty training data."""


class OverBudgetError(UserError):
    """Measured memory went over the plan's budget (a checkpoint was written first)."""

    exit_code = 3


class VerificationError(UserError):
    """An exported model does not compute what the PyTorch model computes."""

    exit_code = 4


class NonFiniteError(UserError):
    """Training produced non-finite losses or gradients several steps in a row (the weights were
    kept at their last finite state and checkpointed)."""

    exit_code = 5
