"""User-facing errors.

Anything a user can cause by passing the wrong path, a checkpoint that does not fit, malformed data or an
impossible hyper-parameter is raised as :class:`UserError`. Command-line entry points run through
:func:`run_cli`, which prints the message as one line and exits with status 2 instead of a traceback.
Programming errors keep their tracebacks.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


# How running out of memory reads in an exception or a log: CUDA ("CUDA out of memory", torch.OutOfMemoryError),
# the CPU allocator ("DefaultCPUAllocator: can't allocate memory"), Python (MemoryError) and the OS ("Cannot
# allocate memory"). One list, shared by the memory sweep and the comparison grid.
OOM_MARKERS = ("out of memory", "outofmemoryerror", "memoryerror", "can't allocate memory", "cannot allocate memory")


def looks_like_out_of_memory(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in OOM_MARKERS)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is running out of memory: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or the CPU
    allocator's ``RuntimeError``. Handlers that turn a user's mistake into one line re-raise these: an OOM is never
    "does not fit this run"."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and looks_like_out_of_memory(str(err)))


class UserError(Exception):
    """A mistake in the user's input, reported as one line without a traceback."""


def checkpoint_write_failure(path: Any, err: BaseException) -> BaseException:
    """What to raise when writing the checkpoint ``path`` failed with ``err`` (a full disk, a missing folder): one
    line saying the previous checkpoint is unchanged (the writers all write to a temporary name first). Running out
    of memory is not a failed write and comes back as itself. One wording for the single-file and the sharded
    writers: ``raise checkpoint_write_failure(path, err) from None``."""
    if is_out_of_memory(err):
        return err
    reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return UserError(f"could not write the checkpoint {path}: {reason}; the previous checkpoint is unchanged")


def run_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls ``main`` and turns a :class:`UserError` into ``error: <message>`` on stderr and exit status 2.

    When ``main`` is jsonargparse's ``CLI``, the command line is parsed by :class:`lit_adapter.cli.parser.OneLineParser`
    (argument mistakes are one line too) and dataclass field docstrings become the options' ``--help``.
    """
    if getattr(main, "__module__", "").startswith("jsonargparse"):
        from jsonargparse import set_parsing_settings

        from lit_adapter.cli.parser import OneLineParser

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        kwargs.setdefault("parser_class", OneLineParser)
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def refuse_file_as_out_dir(out_dir, holds: str) -> None:
    """An ``--out_dir`` that exists as a file is one line, checked before minutes of work (it would fail on the
    first write). ``holds`` names what the folder is for, in the fix."""
    from pathlib import Path

    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder; pass a folder for {holds}")


def require_folder(path, what: str = "checkpoint directory") -> None:
    """``path`` is an existing folder; otherwise one line that says whether it is missing or a file (a file given
    where a folder belongs would otherwise be misread as the first file looked for inside it)."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        raise UserError(f"{what} {path} is a file, not a folder; pass the folder that holds it ({path.parent})")
    if not path.is_dir():
        raise UserError(f"{what} not found: {path}")
