"""Doctest collection (``--doctest-modules``) skips the adapters whose framework is not installed."""

import importlib.util

collect_ignore = [
    f"{module}.py"
    for module, framework in (
        ("lightning", "lightning"),
        ("huggingface", "transformers"),
        ("tensorboard", "tensorboard"),
    )
    if importlib.util.find_spec(framework) is None
]
