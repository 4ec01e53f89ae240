"""The documented import path of the null noise floor; it lives in :mod:`covshift.science.null_floor`."""

from covshift.science.null_floor import (
    DEFAULT_SPLITS,
    NULL_COLUMNS,
    NULL_FILE,
    NullFloor,
    drift_to_null,
    load_null_floor,
    null_distribution,
    null_quantiles,
)

__all__ = ["DEFAULT_SPLITS", "NULL_COLUMNS", "NULL_FILE", "NullFloor", "drift_to_null", "load_null_floor",
           "null_distribution", "null_quantiles"]
