"""The run: records buffered, flushed to a crash-safe directory of Parquet parts, read back."""

from covshift.store.files import RunFileError

__all__ = ["RunFileError"]
