"""One module per fine-tuning method, each defining its :class:`~lit_adapter.tuners.base.Method` instance
(``METHOD``), plus the protocol they share (``base.py``, ``wrapping.py``) and the registry that finds them
(``registry.py``: every ``Method`` a module here defines, with nothing to list by hand).
"""
