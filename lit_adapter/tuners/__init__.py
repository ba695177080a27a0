"""One module per fine-tuning method, each declaring a :class:`~lit_adapter.tuners.base.Method` as ``METHOD``.

The registry that lists them is :data:`lit_adapter.methods.REGISTRY`; nothing here imports it.
"""
