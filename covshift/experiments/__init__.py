"""The reference experiment: a small MNIST CNN trained with and without BatchNorm.

>>> from covshift.experiments import reference_pair, summary
>>> plain, bn = reference_pair(seed=1)
>>> print(summary(bn).trainable, summary(bn).non_trainable)
49266 368
"""

from covshift.experiments.model_summary import ModelSummary, summary
from covshift.experiments.models import reference_cnn, reference_pair

__all__ = ["ModelSummary", "reference_cnn", "reference_pair", "summary"]
