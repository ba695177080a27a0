"""The command lines' parser: jsonargparse's, with mistakes reported as one line that says how to fix them.

jsonargparse answers an unknown option with the whole usage (40 lines) before the error, and a wrong value with a
dump of the type it failed to match ("Subtypes: [typing.Literal[...]]"). :class:`OneLineParser` keeps the parsing
and replaces only the report: ``error: unknown option --train.learnin_rate; did you mean --train.learning_rate?``
or ``error: --quantize nf4 is not one of: bnb.int8, bnb.nf4, bnb.nf4-dq, bnb.fp4, null; did you mean bnb.nf4?``.
Option prefixes are not expanded (``--train.learning_rat`` is unknown, not silently ``--train.learning_rate``).
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from typing import Any, List, NoReturn, Optional

from jsonargparse import ArgumentParser

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN = re.compile(r"(?:Given value|Got value): (.*)")


def _literal_values(annotation: Any) -> List[Any]:
    """The values a ``Literal`` (possibly inside ``Optional``/``Union``) allows; [] for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    values: List[Any] = []
    for arg in typing.get_args(annotation):
        values += [None] if arg is type(None) else _literal_values(arg)
    return values


def _closest(word: str, candidates: List[str]) -> Optional[str]:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


class OneLineParser(ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _option_strings(self) -> List[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _action_for(self, key: str):
        return next((a for a in self._actions if a.dest == key), None)

    def describe_error(self, message: str) -> str:
        """``message`` (jsonargparse's) as one line naming the option, the allowed values and the closest match."""
        unknown = _UNRECOGNIZED.search(message)
        if unknown:
            option = next((tok for tok in unknown.group(1).split() if tok.startswith("-")), unknown.group(1).split()[0])
            name = option.split("=", 1)[0]
            guess = _closest(name, self._option_strings())
            hint = f"; did you mean {guess}?" if guess else ""
            return f"unknown option {name}{hint} (--help lists every option)"
        key = _KEY.search(message)
        if key:
            given = _GIVEN.search(message)
            value = given.group(1).strip() if given else None
            action = self._action_for(key.group(1))
            allowed = _literal_values(getattr(action, "_typehint", None)) if action is not None else []
            option = f"--{key.group(1)}"
            if any(v is not None for v in allowed) and value is not None:
                shown = ["null" if v is None else str(v) for v in allowed]
                guess = _closest(value, shown)
                hint = f"; did you mean {guess}?" if guess else ""
                return f"{option} {value} is not one of: {', '.join(shown)}{hint}"
            expected = getattr(action, "_typehint", None)
            kinds = [a for a in typing.get_args(expected) if a is not type(None)] or [expected]
            kind = " or ".join(getattr(k, "__name__", str(k).replace("typing.", "")) for k in kinds)
            kind += " (or null)" if type(None) in typing.get_args(expected) else ""
            got = f" {value}" if value is not None else ""
            return f"{option}{got} is not a valid {kind}" if expected is not None else message.splitlines()[0]
        return message.strip().splitlines()[0] if message.strip() else "invalid command line"

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # nested parsers report through their parent
            return super().error(message, ex)
        sys.stderr.write(f"error: {self.describe_error(message)}\n")
        raise SystemExit(2)
