"""The ``jsp-fast`` command (entry point ``jsp_fast.app.cli:main``): ``demo``; ``train``, ``sample``,
``eval`` (``runners``); ``compare`` with its ``report`` and ``plots``; ``bench``.

The top layer: it may import training, prune, sparse, cnf and data, and nothing imports it. Nothing
is imported here, so ``python -m jsp_fast.app.cli`` runs the module once.
"""
__all__: list[str] = []
