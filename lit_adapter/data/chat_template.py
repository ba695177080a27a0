"""A jinja chat template rendered as transformers renders it, shared by chat data preparation
(:mod:`lit_adapter.data.chat`) and the tokenizer's own ``apply_chat_template`` (:mod:`lit_adapter.data.bpe_tokenizer`).

One sandboxed environment with transformers' settings and globals (``trim_blocks``/``lstrip_blocks``, loop
controls, ``raise_exception``, ``strftime_now``, ``tojson``, TRL's ``{% generation %}`` tag), compiled once per
template: the same template gives the same text whichever route renders it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from lit_adapter.errors import UserError

Message = Dict[str, str]
"""One turn: ``{"role": "system" | "user" | "assistant", "content": text}``."""


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the special-token names it is rendered with; :meth:`to_dict` is what a prepared
    data set and a run record, and :meth:`from_dict` rebuilds it for generation."""

    name: str
    """A built-in's name, ``"checkpoint"`` (the tokenizer's own) or the template file's path."""
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return _compile(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                                documents=None)
        except jinja2.TemplateError as err:
            raise UserError(f"the {self.name} chat template: {err}") from None

    def prompt(self, text: str, system: Optional[str] = None) -> str:
        """``text`` as a user turn (after ``system``), ending where the assistant's reply begins."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.render(messages, add_generation_prompt=True)

    def end_of_turn(self) -> str:
        """The marker the template writes after an assistant reply (``<|eot_id|>``, ``<|im_end|>``, ``</s>``): where
        generation stops."""
        probe = "\u2063reply\u2063"
        user = [{"role": "user", "content": "hi"}]
        try:
            turn = self.render(user + [{"role": "assistant", "content": probe}])
        except UserError:  # a template that wants more than one exchange to render: stop at EOS only
            return ""
        tail = turn[turn.rfind(probe) + len(probe):] if probe in turn else ""
        return tail.strip().split()[0] if tail.strip() else ""

    def to_dict(self) -> Dict[str, str]:
        return {"name": self.name, "template": self.source, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "end_of_turn": self.end_of_turn()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ChatTemplate":
        return cls(data["name"], data["template"], data.get("bos_token", ""), data.get("eos_token", ""))


_COMPILED: Dict[str, Any] = {}


def _compile(source: str):
    """The template compiled in transformers' environment (``_cached_compile_jinja_template``, transformers 4.4x-5.x),
    so the same template gives the same text."""
    if source in _COMPILED:
        return _COMPILED[source]
    import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # TRL-style templates mark assistant text with {% generation %}; the text renders as is (we find the
        # assistant turns by rendering prefixes, so the markup is not needed, but it must parse)
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        _COMPILED[source] = env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"the chat template does not parse: {err.message} (template line {err.lineno})") from None
    return _COMPILED[source]
