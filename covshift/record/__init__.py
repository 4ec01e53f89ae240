"""Recording while a model trains: which layers, which steps, the hooks, probes and ranks."""
