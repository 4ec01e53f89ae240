"""Adapters for the places people already train and watch training.

- :mod:`covshift.integrations.lightning`: ``CovshiftCallback`` for a Lightning ``Trainer``.
- :mod:`covshift.integrations.huggingface`: ``CovshiftCallback`` for a Hugging Face ``Trainer``.
- :mod:`covshift.integrations.tensorboard`: :func:`covshift.to_tensorboard`, a stored run as
  TensorBoard scalars and histograms.

Importing this package imports no framework; each module imports its own
(install them with ``pip install covshift[lightning]``, ``[huggingface]`` or ``[tensorboard]``).
"""
