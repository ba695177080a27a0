"""Model configurations: the LLaMA family (LLaMA 1/2/3, OpenLLaMA, TinyLlama, TinyStories), GPT-2 and RoBERTa.

A :class:`Config` describes the shape of the network only (no PEFT settings, no training settings), so the same
object serves the base model, every PEFT variant and the checkpoint converters. ``Config.from_name`` knows the
published LLaMA-family sizes; ``Config.from_file`` and ``Config.save`` read and write the ``model_config.json``
that sits in every ``--checkpoint_dir``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Optional, Union

from lit_adapter.errors import UserError, require_folder
from lit_adapter.model.rope import ORIGINAL, check_rope_scaling, context_error, describe_window, parse_rope_scaling


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048
    """The longest sequence the model is built for (RoPE cache length, KV cache limit); with ``rope_scaling`` the
    scaled window."""
    vocab_size: int = 32000
    padded_vocab_size: Optional[int] = None
    """Rows of the embedding and the output head; ``None`` means ``vocab_size``. Logits are cut to ``vocab_size``."""
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; ``None`` means ``n_head`` (multi-head attention)."""
    n_embd: int = 4096
    intermediate_size: int = 11008
    """Hidden size of the MLP (SwiGLU's, or GPT-2's 4 * n_embd)."""
    rope_base: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    """RoPE scaling past the pretrained window, in HF ``config.json``'s terms: ``rope_type`` (linear, dynamic, yarn,
    llama3), ``factor``, ``original_max_position_embeddings`` (the pretrained window) and the type's own fields
    (``lit_adapter.model.rope``). ``None``: plain RoPE. :meth:`with_rope_scaling` adds it to a pretrained config."""
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """Whether the output head shares its weight with the token embedding (llama2.c's TinyStories models, GPT-2)."""
    # The family, chosen field by field as LitGPT does; the defaults are LLaMA's (old model_config.json files
    # without these fields load as LLaMA). GPT-2: LayerNorm, GptNeoxMLP, bias, learned positions, tanh GELU.
    norm_class: str = "RMSNorm"
    """``RMSNorm`` (LLaMA) or ``LayerNorm`` (GPT-2: with a bias)."""
    mlp_class: str = "LLaMAMLP"
    """``LLaMAMLP`` (SwiGLU: gate/up/down) or ``GptNeoxMLP`` (``down(gelu(up(x)))``, GPT-2's c_fc / c_proj)."""
    bias: bool = False
    """Whether every linear of the blocks (q/k/v/o and the MLP's) has a bias (GPT-2)."""
    lm_head_bias: bool = False
    """Whether the output head has a bias."""
    position_embedding: str = "rope"
    """``rope`` (rotary, LLaMA) or ``learned`` (an absolute position embedding ``transformer.wpe``, GPT-2)."""
    gelu_approximate: str = "none"
    """The GptNeoxMLP's GELU: ``none`` (exact erf) or ``tanh`` (GPT-2's ``gelu_new``)."""
    # The encoder family (RoBERTa, BERT: lit_adapter.model.encoder). The defaults are the decoder's.
    causal: bool = True
    """False: an encoder, whose tokens attend both ways over every token that is not ``pad_token_id``; it has
    no language-model head (a classification head reads its first row) and cannot decode."""
    norm_placement: str = "pre"
    """``pre`` (the decoders: norm, sublayer, residual add, and a final ``ln_f``) or ``post`` (BERT/RoBERTa:
    sublayer, residual add, then the norm; a LayerNorm on the embeddings, ``transformer.ln_emb``, and no ``ln_f``)."""
    pad_token_id: Optional[int] = None
    """An encoder's padding token: keys holding it are masked out, and RoBERTa's positions count around it."""
    type_vocab_size: int = 0
    """Rows of the token-type (segment) embedding ``transformer.wtt`` (BERT 2, RoBERTa 1); 0: none."""
    hidden_dropout: float = 0.0
    """An encoder's dropout on the embeddings and on each sublayer's output (HF ``hidden_dropout_prob``)."""
    attention_dropout: float = 0.0
    """An encoder's dropout on the attention probabilities (HF ``attention_probs_dropout_prob``)."""
    classifier_dropout: Optional[float] = None
    """The encoder's classification head's dropout; None means ``hidden_dropout`` (HF ``classifier_dropout``)."""

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            raise UserError(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.rope_scaling and self.position_embedding != "rope":
            raise UserError(f"rope_scaling needs rotary positions; this model has position_embedding="
                            f"{self.position_embedding!r} (its window is block_size={self.block_size})")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.block_size)
        if not self.causal and (self.pad_token_id is None or self.position_embedding == "rope"):
            raise UserError("an encoder (causal=false) needs pad_token_id and learned positions "
                            "(position_embedding learned or learned_offset)")
        if self.position_embedding == "learned_offset" and self.pad_token_id is None:
            raise UserError("position_embedding=learned_offset counts positions after pad_token_id; set it")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1), got {value!r}")

    @property
    def position_rows(self) -> int:
        """Rows of the learned position embedding ``transformer.wpe``: ``block_size``, plus RoBERTa's offset (the
        positions up to ``pad_token_id`` that no token uses: HF's ``max_position_embeddings`` is 514 for 512)."""
        offset = self.pad_token_id + 1 if self.position_embedding == "learned_offset" else 0
        return self.block_size + offset

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def original_block_size(self) -> int:
        """The pretrained window: ``block_size`` itself unless RoPE is scaled."""
        return self.rope_scaling[ORIGINAL] if self.rope_scaling else self.block_size

    def describe_window(self) -> str:
        """``"2048 tokens (linear x4 of the pretrained 512)"``, or ``"512 tokens"`` without scaling."""
        return describe_window(self.block_size, self.rope_scaling)

    def window_error(self, length: int, what: str) -> str:
        """The one line that refuses ``length`` tokens past the window: with rotary positions it names RoPE
        scaling (``rope.context_error``); learned positions (GPT-2, an encoder) have no more rows, so cut."""
        if self.position_embedding == "rope":
            return context_error(self.block_size, self.rope_scaling, length, what)
        return (f"{what}={length} exceeds the model's {self.block_size} learned positions; cut the input "
                f"(--data.max_seq_length: at most {self.block_size} less any virtual tokens)")

    def with_rope_scaling(self, rope_scaling: Optional[Dict[str, Any]]) -> "Config":
        """This config with its RoPE scaled by ``rope_scaling`` (HF ``config.json`` fields, ``type`` or
        ``rope_type``); the window becomes ``factor x`` the pretrained one.

        The pretrained window defaults to this config's (its ``block_size``, or the original window of a scaling it
        already has, which ``rope_scaling`` replaces). ``None`` returns the config unchanged.
        """
        scaling = parse_rope_scaling(rope_scaling)
        if scaling is None:
            return self
        scaling.setdefault(ORIGINAL, self.original_block_size)
        if scaling == self.rope_scaling:
            return self  # e.g. the scaling a fine-tuned run recorded, on a base that already has it
        return replace(self, rope_scaling=scaling, block_size=int(scaling["factor"] * scaling[ORIGINAL]))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in name_to_config:
            known = ", ".join(sorted(name_to_config))
            raise UserError(f"unknown model name {name!r}; known names: {known}")
        return replace(cls(**name_to_config[name]), **overrides)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"model config {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"model config {path} is not a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"model config {path} has unknown fields: {', '.join(unknown)}")
        for name, value in data.items():
            expected = _FIELD_TYPES.get(str(known[name].type))  # a field of another kind is checked by its own code
            if expected is None or (value is None and str(known[name].type).startswith("Optional")):
                continue
            # JSON has one number type: an integral float is a fine int, a bool is never a number
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                if not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
                    raise UserError(f"model config {path}: {name} must be {expected.__name__}, got {value!r}")
        return cls(**data)

    @classmethod
    def from_checkpoint_dir(cls, checkpoint_dir: Union[str, Path]) -> "Config":
        checkpoint_dir = Path(checkpoint_dir)
        require_folder(checkpoint_dir)
        return cls.from_file(checkpoint_dir / "model_config.json")

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_CHOICES = {"norm_class": ("RMSNorm", "LayerNorm"), "mlp_class": ("LLaMAMLP", "GptNeoxMLP"),
            "position_embedding": ("rope", "learned", "learned_offset"), "gelu_approximate": ("none", "tanh"),
            "norm_placement": ("pre", "post")}

_FIELD_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Optional[int]": int,
                "Optional[float]": float, "Optional[Dict[str, Any]]": dict}
"""The annotation of each Config field (as written, under ``from __future__ import annotations``) -> its type."""


@dataclass
class ModelArgs:
    """Changes to the checkpoint's model for this run (recorded in hparams.json and final/adapter_config.json)."""

    rope_scaling: Optional[Dict[str, Any]] = None
    """Extend the context window by RoPE scaling, e.g. '{"type": "linear", "factor": 4}' (position interpolation,
    4x the pretrained window); types linear, dynamic, yarn, llama3 with HF config.json's fields."""

    def apply(self, config: Config) -> Config:
        return config.with_rope_scaling(self.rope_scaling)


def _llama_hidden(n_embd: int, multiple_of: int) -> int:
    """SwiGLU width as Meta and llama2.c compute it: 2/3 of 4*d, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * n_embd) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_LLAMA3_SCALING = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
_GPT2 = dict(norm_class="LayerNorm", mlp_class="GptNeoxMLP", bias=True, position_embedding="learned",
             gelu_approximate="tanh", tie_embeddings=True, norm_eps=1e-5)

_ROBERTA = dict(causal=False, norm_placement="post", norm_class="LayerNorm", mlp_class="GptNeoxMLP", bias=True,
                position_embedding="learned_offset", pad_token_id=1, type_vocab_size=1, norm_eps=1e-5,
                hidden_dropout=0.1, attention_dropout=0.1)

configs = [
    # LLaMA 1 (Touvron et al. 2023)
    dict(name="7B", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    dict(name="13B", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, norm_eps=1e-6),
    dict(name="30B", n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, norm_eps=1e-6),
    dict(name="65B", n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, norm_eps=1e-5),
    # OpenLLaMA (openlm-research); v2 was released for 3B and 7B only
    dict(name="open_llama_3b", n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640, norm_eps=1e-6),
    dict(name="open_llama_7b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    dict(name="open_llama_13b", n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, norm_eps=1e-6),
    dict(name="open_llama_3b_v2", n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640, norm_eps=1e-6),
    dict(name="open_llama_7b_v2", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    # Llama 2 (Touvron et al. 2023b); 70B uses grouped-query attention
    dict(name="Llama-2-7b", block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    dict(name="Llama-2-13b", block_size=4096, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    dict(
        name="Llama-2-70b", block_size=4096, n_layer=80, n_head=64, n_query_groups=8, n_embd=8192,
        intermediate_size=28672,
    ),
    # TinyLlama-1.1B (GQA with 4 key/value heads)
    dict(name="TinyLlama-1.1B", n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    # karpathy's TinyStories Llama-2 models (llama2.c); the classifier is tied to the embedding
    dict(
        name="stories260K", block_size=512, vocab_size=512, n_layer=5, n_head=8, n_query_groups=4, n_embd=64,
        intermediate_size=_llama_hidden(64, 4), tie_embeddings=True,
    ),
    dict(
        name="stories15M", block_size=256, n_layer=6, n_head=6, n_embd=288,
        intermediate_size=_llama_hidden(288, 32), tie_embeddings=True,
    ),
    dict(
        name="stories42M", block_size=1024, n_layer=8, n_head=8, n_embd=512,
        intermediate_size=_llama_hidden(512, 32), tie_embeddings=True,
    ),
    dict(
        name="stories110M", block_size=1024, n_layer=12, n_head=12, n_embd=768,
        intermediate_size=_llama_hidden(768, 32), tie_embeddings=True,
    ),
    # Llama 3 (Meta 2024): a 128256-token tiktoken-style BPE vocabulary, GQA, rope_base 500000; 3.1 and 3.2
    # scale RoPE by the llama3 rule to 128K tokens (HF config.json's rope_scaling)
    dict(
        name="Llama-3-8B", block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_query_groups=8,
        n_embd=4096, intermediate_size=14336, rope_base=500000.0,
    ),
    dict(
        name="Llama-3.1-8B", block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_query_groups=8,
        n_embd=4096, intermediate_size=14336, rope_base=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
    ),
    dict(
        name="Llama-3.2-1B", block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_query_groups=8,
        n_embd=2048, intermediate_size=8192, rope_base=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0),
        tie_embeddings=True,
    ),
    # GPT-2 (Radford et al. 2019): LayerNorm, learned positions, a GELU MLP, biases everywhere, a tied head
    dict(name="gpt2", block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
         intermediate_size=3072, **_GPT2),
    dict(name="gpt2-medium", block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=1024,
         intermediate_size=4096, **_GPT2),
    dict(name="gpt2-large", block_size=1024, vocab_size=50257, n_layer=36, n_head=20, n_embd=1280,
         intermediate_size=5120, **_GPT2),
    # RoBERTa (Liu et al. 2019): a post-norm encoder, positions counted after the padding id (512 + 2 rows), one
    # token type, GELU, biases, dropout 0.1; vocab_size 50265 with <s> 0, <pad> 1, </s> 2, <mask> 50264
    dict(name="roberta-base", block_size=512, vocab_size=50265, n_layer=12, n_head=12, n_embd=768,
         intermediate_size=3072, **_ROBERTA),
    dict(name="roberta-large", block_size=512, vocab_size=50265, n_layer=24, n_head=16, n_embd=1024,
         intermediate_size=4096, **_ROBERTA),
    # BERT (Devlin et al. 2019): RoBERTa's encoder with absolute positions, two token types, pad id 0, eps 1e-12
    dict(name="bert-base-uncased", block_size=512, vocab_size=30522, n_layer=12, n_head=12, n_embd=768,
         intermediate_size=3072, **dict(_ROBERTA, position_embedding="learned", pad_token_id=0, type_vocab_size=2,
                                        norm_eps=1e-12)),
    # tiny configurations for unit tests
    dict(name="tiny", block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=32, intermediate_size=88),
    dict(
        name="tiny-gqa", block_size=128, vocab_size=512, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
        intermediate_size=88,
    ),
    dict(name="tiny-gpt2", block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=32, intermediate_size=128,
         **_GPT2),
    dict(
        name="tiny-llama3", block_size=256, vocab_size=512, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
        intermediate_size=88, rope_base=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING, factor=8.0, original_max_position_embeddings=32),
    ),
    dict(name="tiny-roberta", block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=32, intermediate_size=64,
         **dict(_ROBERTA, hidden_dropout=0.0, attention_dropout=0.0)),
    dict(
        name="tiny-32k", block_size=128, vocab_size=32000, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
        intermediate_size=88,
    ),
]
name_to_config = {c["name"]: c for c in configs}
