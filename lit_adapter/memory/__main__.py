"""``python -m lit_adapter.memory '<cell json>'``: one measurement in this fresh process (see measure.py)."""

import sys

from lit_adapter.memory.measure import _child_main

_child_main(sys.argv[1:])
