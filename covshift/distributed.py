"""The documented import path of the distributed names; they live in :mod:`covshift.record.distributed`."""

from covshift.record.distributed import DistributedError, JoinableSteps, NonWriterRun

__all__ = ["DistributedError", "JoinableSteps", "NonWriterRun"]
