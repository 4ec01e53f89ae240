"""Defaults that the library and the ``covshift`` command share, declared once.

Kept apart from the modules that use them (and free of heavy imports) so that
``covshift --help`` shows them without loading numpy, pandas or torch.
"""

#: The metrics the report and the command draw unless told otherwise: normalized W1, mean shift, std ratio.
DEFAULT_METRICS = ("wasserstein", "mean_shift", "std_ratio")
#: Layers that get detail figures by default: the most drifting.
DEFAULT_TOP = 8
#: Drawn steps per line or heatmap row at most (tables always use every step).
DEFAULT_MAX_POINTS = 400
#: Runs with at least this many layers get a progress bar by default.
PROGRESS_LAYERS = 30
#: The tallest figure the report writes, in pixels; figures of more layers are split into pages.
MAX_HEIGHT_PX = 4000
