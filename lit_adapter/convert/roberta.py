"""HF ``transformers`` RoBERTa and BERT encoders -> lit-adapter: config fields and weights.

``RobertaModel`` / ``RobertaForSequenceClassification`` (and ``BertModel`` / ``BertForSequenceClassification``)
become the encoder of :mod:`lit_adapter.model.encoder`: the same linears under our names, nothing transposed or
fused, so the conversion is exact. Name map (``{}`` the layer; ``roberta.`` / ``bert.`` prefixes dropped):

* ``embeddings.word_embeddings`` / ``position_embeddings`` / ``token_type_embeddings`` / ``LayerNorm`` ->
  ``transformer.wte`` / ``wpe`` / ``wtt`` / ``ln_emb``;
* ``encoder.layer.{}.attention.self.query/key/value`` -> ``attn.q_proj/k_proj/v_proj``,
  ``attention.output.dense`` -> ``attn.o_proj``, ``attention.output.LayerNorm`` -> ``norm_1``,
  ``intermediate.dense`` -> ``mlp.up_proj``, ``output.dense`` -> ``mlp.down_proj``, ``output.LayerNorm`` -> ``norm_2``;
* the classification head: RoBERTa's ``classifier.dense`` / ``classifier.out_proj`` -> ``score.dense`` /
  ``score.out_proj``; BERT's ``pooler.dense`` (dense + tanh on the first token) / ``classifier`` -> the same two.
  A bare ``RobertaModel``'s pooler is dropped: RoBERTa's classifier has its own dense layer and never reads it.

A converted classifier keeps its head in ``lit_model.safetensors`` (a run with as many labels loads it; a new run on
a base ``RobertaModel`` initialises one, as HF does).
"""

from __future__ import annotations

import re
from typing import Any, Dict

from lit_adapter.convert.common import StateDict
from lit_adapter.errors import UserError
from lit_adapter.model.config import Config

ENCODER_TYPES = ("roberta", "bert")
"""``config.json`` ``model_type`` values this module converts."""

_LAYER = {
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj", "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj", "attention.output.LayerNorm": "norm_1",
    "intermediate.dense": "mlp.up_proj", "output.dense": "mlp.down_proj", "output.LayerNorm": "norm_2",
}
_EMBEDDINGS = {"word_embeddings": "wte", "position_embeddings": "wpe", "token_type_embeddings": "wtt",
               "LayerNorm": "ln_emb"}
_HEAD = {"classifier.dense": "score.dense", "classifier.out_proj": "score.out_proj"}  # RoBERTa's
_BERT_HEAD = {"pooler.dense": "score.dense", "classifier": "score.out_proj"}


def config_from_hf_encoder(hf: Dict[str, Any], name: str = "") -> Config:
    """Our :class:`Config` for an HF ``RobertaConfig`` or ``BertConfig`` dict; variants we do not implement raise."""
    model_type = hf.get("model_type")
    act = hf.get("hidden_act", "gelu")
    bad = [f"hidden_act={act!r}"] if act != "gelu" else []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        bad.append(f"position_embedding_type={hf['position_embedding_type']!r}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        bad.append("is_decoder / add_cross_attention")
    if bad:
        raise UserError(f"config.json uses {model_type} features lit-adapter does not implement: {', '.join(bad)}")
    roberta = model_type == "roberta"
    try:
        pad = hf.get("pad_token_id", 1 if roberta else 0)
        rows = hf["max_position_embeddings"]
        return Config(
            name=name, block_size=rows - (pad + 1 if roberta else 0), vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
            causal=False, norm_placement="post", norm_class="LayerNorm", mlp_class="GptNeoxMLP", bias=True,
            position_embedding="learned_offset" if roberta else "learned", pad_token_id=pad,
            type_vocab_size=hf.get("type_vocab_size", 2), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"),
        )
    except KeyError as err:
        raise UserError(f"config.json lacks the field {err.args[0]!r}") from None


def hf_encoder_to_lit(state_dict: StateDict, config: Config, source: str = "checkpoint") -> StateDict:
    """An HF RoBERTa / BERT state dict (bare model or sequence classifier) under our names."""
    bert = config.position_embedding == "learned"
    head = _BERT_HEAD if bert else _HEAD
    classifier = any(name.startswith("classifier.") for name in state_dict)
    out: StateDict = {}
    for name, tensor in state_dict.items():
        key = re.sub(r"^(roberta|bert)\.", "", name)
        if key.endswith(("position_ids", "token_type_ids")):  # index buffers, not weights
            continue
        module, _, kind = key.rpartition(".")
        if module.startswith("pooler.") and not (bert and classifier):
            continue  # a bare model's pooler: no classifier of ours reads it
        if module in head:
            out[f"{head[module]}.{kind}"] = tensor
            continue
        match = re.fullmatch(r"embeddings\.(\w+)", module)
        if match and match.group(1) in _EMBEDDINGS:
            out[f"transformer.{_EMBEDDINGS[match.group(1)]}.{kind}"] = tensor
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
        if match and match.group(2) in _LAYER:
            out[f"transformer.h.{match.group(1)}.{_LAYER[match.group(2)]}.{kind}"] = tensor
            continue
        raise UserError(f"{source} holds a tensor that is not part of an encoder lit-adapter converts: {name}")
    return out


def head_labels(state_dict: StateDict) -> int:
    """How many labels a converted classifier's head has (0: the checkpoint has no head)."""
    bias = state_dict.get("score.out_proj.bias")
    return 0 if bias is None else bias.shape[0]
