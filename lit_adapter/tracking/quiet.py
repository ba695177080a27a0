"""Keeps library chatter out of the way of the progress bar and the summary, without hiding real errors.

Some libraries log the same harmless line on every call or print a scary-looking one at import:

* bitsandbytes' int8 matmul logs "inputs will be cast from torch.float32 to float16" once per linear call
  (thousands of lines for a few steps); it is shown once, as a note that says what it means;
* bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community" whenever the
  optional ``kernels`` package is absent; it reads like an error but only means its built-in 4-bit kernel is used,
  so it is said once in those words;
* wandb warns that "the anonymous setting has no effect" because Lightning passes ``anonymous=None``; dropped.

Only these known messages are touched, by a logging filter on the loggers that emit them; every other record,
warnings and errors included, passes unchanged. :func:`install` is idempotent and runs before those libraries are
imported (``import_bitsandbytes``), so messages logged at import time are filtered too.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

# logger name -> (message prefix, replacement shown once; None drops it)
_RULES: Dict[str, Tuple[Tuple[str, Optional[str]], ...]] = {
    "bitsandbytes.autograd._functions": (
        ("MatMul8bitLt: inputs will be cast", "note: bitsandbytes' int8 layers compute in float16 (their inputs are "
         "cast from the run's dtype); this is expected with --quantize bnb.int8 and shown once"),
    ),
    "bitsandbytes.backends.cpu.ops": (
        ("Failed to load CPU gemm_4bit_forward", "note: bitsandbytes' optional AVX512 4-bit CPU kernel (the "
         "'kernels' package) is not installed; its built-in kernel is used, with the same results"),
    ),
}


class _OnceFilter(logging.Filter):
    """Lets each known message through once (reworded), and everything else unchanged."""

    def __init__(self, rules: Tuple[Tuple[str, Optional[str]], ...]) -> None:
        super().__init__()
        self.rules = rules
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        for prefix, replacement in self.rules:
            if message.startswith(prefix):
                if replacement is None or prefix in self.seen:
                    return False
                self.seen.add(prefix)
                record.msg, record.args, record.levelno, record.levelname = replacement, (), logging.INFO, "INFO"
                return True
        return True


_installed = False


def install() -> None:
    """Attaches the filters (once per process)."""
    global _installed
    if _installed:
        return
    for name, rules in _RULES.items():
        logger = logging.getLogger(name)
        logger.addFilter(_OnceFilter(rules))
        if logger.level == logging.NOTSET and not logging.getLogger().handlers:
            # without a handler anywhere Python prints WARNING+ through its last-resort handler; an INFO note
            # would vanish there, so give these loggers a plain handler of their own
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    _installed = True


def import_bitsandbytes():
    """``import bitsandbytes`` with the filters in place (its CPU backend logs at import time)."""
    install()
    import bitsandbytes

    return bitsandbytes
