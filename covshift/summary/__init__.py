"""The per-channel summary of a layer input: computed on the device (summarize), merged, finalized to a stored record."""
