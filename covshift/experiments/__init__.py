"""The reference experiment: a small MNIST CNN trained with and without BatchNorm.

>>> from covshift.experiments import model_table, reference_pair
>>> plain, bn = reference_pair(seed=1)
>>> print(model_table(bn).trainable, model_table(bn).non_trainable)
49266 368
"""

from covshift.experiments.model_table import ModelTable, model_table
from covshift.experiments.models import reference_cnn, reference_pair

__all__ = ["ModelTable", "model_table", "reference_cnn", "reference_pair"]
