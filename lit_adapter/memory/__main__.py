"""``python -m lit_adapter.memory '<cell json>'``: one measurement in this fresh process (see measure.py)."""

import sys

from lit_adapter.memory.measure import child_main

child_main(sys.argv[1:])
