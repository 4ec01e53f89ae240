"""The run: records buffered, flushed to a crash-safe directory of Parquet parts, read back."""

from covshift.store.checked import RunFileError

__all__ = ["RunFileError"]
