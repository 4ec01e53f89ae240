"""How covshift reports its own faults: a warning class of its own, so users can filter it."""


class CovshiftWarning(UserWarning):
    """Something covshift could not record or store; the user's training is unaffected."""
