"""The report, one way: numbers from the runs (data), figures of them, then the HTML page."""
