"""ml_collections configs for ``python -m attnzoo.train``; each file's docstring gives its command
and the result it should reach."""
