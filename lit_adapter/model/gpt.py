"""One readable model: LLaMA (RMSNorm, rotary embeddings, grouped-query attention, a SwiGLU MLP), GPT-2 and the
RoBERTa encoder.

The family is chosen by :class:`Config` fields, as in LitGPT: ``norm_class`` (RMSNorm or LayerNorm),
``mlp_class`` (LLaMAMLP or GptNeoxMLP, a GELU MLP), ``bias`` (on every linear of the blocks),
``position_embedding`` (rope, or a learned absolute ``transformer.wpe`` added to the token embeddings) and
``lm_head_bias``; ``causal`` False with ``norm_placement="post"`` makes it an encoder (RoBERTa, BERT: bidirectional
attention over the non-padding tokens, post-norm blocks, no language-model head; its embeddings and classification
head are in :mod:`lit_adapter.model.encoder`). GPT-2's fused ``c_attn`` is held as separate
``q_proj``/``k_proj``/``v_proj`` (the converters split and transpose HF's Conv1D weights), so every PEFT method sees
one layout for every family.

The LLaMA network follows Touvron et al. 2023 and matches HF ``transformers``' ``LlamaForCausalLM`` (GPT-2:
``GPT2LMHeadModel``) logit for logit on converted weights (rotary embeddings use the "rotate half" layout; the
converters permute Meta's and llama2.c's interleaved q/k weights into it). The cos/sin tables come from :mod:`lit_adapter.model.rope`, which also scales them past
the pretrained window when ``Config.rope_scaling`` asks (linear, dynamic NTK, YaRN, llama3).

Hook points for the PEFT methods, so that none of them subclasses the model or copies a ``forward``. A method
attaches either by wrapping a linear (``lit_adapter.tuners.wrapping``) or by setting a module into one of these
slots, all ``None`` (nothing) by default:

* ``CausalSelfAttention.adapter`` computes the layer's attention from the RoPE'd ``q`` (B, nh, T, hs) and the cached,
  *grouped* ``k``, ``v`` (B, ng, S, hs; never repeated per query head: :func:`attend` groups them). It is called as
  ``adapter(attn, q, k, v, input_pos)`` in place of :meth:`CausalSelfAttention.scaled_dot_product_attention`,
  which it may call for the base part (LLaMA-Adapter adds its gated prompt attention to it; prefix tuning attends
  over its prefix keys in the same softmax).
  ``attention_kernel`` swaps dense attention for a sparse pattern inside that base part.
* ``Block.attn_adapter`` and ``Block.mlp_adapter`` transform the attention's and the MLP's output before the
  residual add; ``Block.out_adapter`` transforms the block's output (bottleneck adapters).
* ``GPT.virtual_tokens`` occupies the positions before the first real token, for prompt tuning, P-tuning and
  prefix tuning. It has ``num_virtual_tokens`` (P) and ``forward(x, input_pos)``, which gets the real tokens'
  embeddings and returns them with the rows of virtual tokens that enter now prepended (or as they are: prefix
  tuning's virtual tokens are keys and values only). The real tokens then sit at positions ``P, P + 1, ...``
  (RoPE and KV-cache slots; the cache gets P more slots) and the rows of virtual tokens are dropped before the
  final norm, so logits, hidden states and the loss see only the real tokens. Real plus virtual tokens must fit in
  ``block_size``.

Packing (``cu_seqlens``, :mod:`lit_adapter.model.packing`): one row may hold several examples end to end; each gets
positions from 0 (after its own virtual tokens) and attends only inside itself, so its logits are its logits alone.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_adapter.model.config import Config
from lit_adapter.model.encoder import FIRST_ROW, encoder_inputs, key_mask_for_attention
from lit_adapter.model.packing import PackedLayout
from lit_adapter.errors import UserError
from lit_adapter.model.rope import RopeCache, build_rope_cache, dynamic_length


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                # post-norm blocks end normalized: the encoder's norm is on its input (ln_emb) instead
                ln_f=build_norm(config) if config.norm_placement == "pre" else nn.Identity(),
            )
        )
        if config.position_embedding != "rope":  # GPT-2, RoBERTa: one learned vector per absolute position
            self.transformer.wpe = nn.Embedding(config.position_rows, config.n_embd)
        if config.type_vocab_size:  # BERT's segments (RoBERTa has one type)
            self.transformer.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
        if config.norm_placement == "post":
            self.transformer.ln_emb = build_norm(config)
        # an encoder predicts no tokens: a classification head (lit_adapter.model.heads) reads its first row
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias) \
            if config.causal else None
        if config.tie_embeddings and config.causal:
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self.virtual_tokens: Optional[nn.Module] = None  # the prompt methods' hook (see the module docstring)
        # Built lazily on the device of the input: a plain attribute, so it is neither saved nor materialized.
        self._rope_cache: Optional[RopeCache] = None
        self._rope_key: Optional[tuple] = None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions before the first real token (0 without a prompt method): the real tokens' context is the rest."""
        return 0 if self.virtual_tokens is None else self.virtual_tokens.num_virtual_tokens

    def rope_cache(self, device: torch.device, seq_len: int = 0) -> RopeCache:
        """cos and sin tables ``(rows, head_size)`` for positions ``0..rows-1`` (``lit_adapter.model.rope``).

        ``seq_len`` is the length of the sequence seen (the longest position + 1), which only dynamic NTK scaling
        depends on: past the original window its table is rebuilt for that length (``seq_len`` rows).
        """
        dynamic = dynamic_length(self.config.rope_scaling, seq_len)
        key = (device, dynamic)
        if self._rope_cache is None or self._rope_key != key:
            self._rope_cache = build_rope_cache(
                dynamic or self.config.block_size, self.config.head_size, self.config.rope_base, device,
                self.config.rope_scaling, dynamic,
            )
            self._rope_key = key
        return self._rope_cache

    def forward(
        self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, return_hidden: Union[bool, str] = False,
        cu_seqlens: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)``.

        ``cu_seqlens`` (``(N + 1,)`` offsets, training and scoring only) says that ``idx`` ``(1, L)`` packs N
        examples end to end, example ``i`` at ``cu_seqlens[i]:cu_seqlens[i + 1]``: see :meth:`forward_packed`.
        A :class:`PackedLayout` built on the host may stand for it (no read of the offsets back from a GPU).

        ``input_pos`` (``(T,)`` positions) switches to incremental decoding with the KV cache set by
        :meth:`set_kv_cache`; without it the whole sequence is processed causally from position 0. Both count real
        tokens: with ``virtual_tokens`` the model shifts them past its P virtual positions.
        ``return_hidden`` stops before the head and returns the final normalized states ``(B, T, n_embd)``, which
        :meth:`output_logits` turns into logits (the head-chunked loss does that a chunk at a time);
        ``return_hidden="first"`` (``encoder.FIRST_ROW``) returns the first row's ``(B, n_embd)``, virtual tokens
        included, which an encoder's classification head reads. An encoder (``Config.causal`` False) attends both
        ways over the tokens that are not ``pad_token_id`` and takes ``token_type_ids`` ``(B, T)`` (default 0).
        """
        if not self.config.causal and (cu_seqlens is not None or input_pos is not None):
            raise UserError("an encoder (causal=false) neither decodes (input_pos) nor packs rows (cu_seqlens): "
                            "each of its tokens attends to the whole padded row")
        if cu_seqlens is not None:
            if input_pos is not None or idx.shape[0] != 1:
                raise ValueError("a packed forward takes one row (1, L) and no input_pos (it is not decoding)")
            return self.forward_packed(idx, PackedLayout.from_cu_seqlens(cu_seqlens), return_hidden)
        B, T = idx.shape
        P = self.num_virtual_tokens
        if input_pos is None and P + T > self.config.block_size:
            what = f"sequence length (with {P} virtual tokens)" if P else "sequence length"
            raise UserError(self.config.window_error(P + T, what))
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if self.virtual_tokens is not None:
            x = self.virtual_tokens(x, input_pos)  # (B, P_in + T, n_embd): P_in rows of virtual tokens enter now
        P_in = x.shape[1] - T
        if input_pos is not None and P:  # the real tokens' positions (and cache slots) follow the virtual ones
            input_pos = torch.cat([torch.arange(P_in, device=input_pos.device), input_pos + P])
        key_mask = None
        if not self.config.causal:  # positions, token types, the embedding norm and the padding mask
            x, key_mask = encoder_inputs(self, idx, x, P_in, token_type_ids)  # (B, P_in + T, C), (B, P_in + T)
            cos = sin = None
        elif self.config.position_embedding == "learned":
            pos = torch.arange(P - P_in, P + T, device=idx.device) if input_pos is None else input_pos
            x = x + self.transformer.wpe(pos)  # (B, P_in + T, n_embd): the virtual rows get positions 0..P-1 too
            cos = sin = None  # no rotation
        else:
            seen = P + T if input_pos is None else self.positions_seen(input_pos)
            cos, sin = self.rope_cache(idx.device, seen)
            if input_pos is None:
                cos, sin = cos[P - P_in : P + T], sin[P - P_in : P + T]  # (P_in + T, hs)
            else:
                cos, sin = cos.index_select(0, input_pos), sin.index_select(0, input_pos)

        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, input_pos, None, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos, None, key_mask)
        if return_hidden == FIRST_ROW:
            return self.transformer.ln_f(x[:, 0])  # (B, n_embd)
        x = self.transformer.ln_f(x[:, P_in:] if P_in else x)  # (B, T, n_embd): the real tokens only
        return x if return_hidden else self.output_logits(x)

    def forward_packed(self, idx: torch.Tensor, layout: PackedLayout, return_hidden: bool = False) -> torch.Tensor:
        """Logits ``(1, L, vocab_size)`` of the examples packed in ``idx`` ``(1, L)`` as ``layout`` says, each
        computed as if alone: its own virtual tokens in front, positions from 0, attention inside itself."""
        P = self.num_virtual_tokens
        longest = max(layout.lengths)
        if P + longest > self.config.block_size:
            what = f"longest packed example (with {P} virtual tokens)" if P else "longest packed example"
            raise UserError(self.config.window_error(P + longest, what))
        x = self.transformer.wte(idx)  # (1, L, n_embd)
        if self.virtual_tokens is not None:  # each example gets its own virtual rows: (1, P_in + T_i, n_embd) each
            x = torch.cat([self.virtual_tokens(x_i) for x_i in layout.split(x, 1)], dim=1)
        P_in = (x.shape[1] - idx.shape[1]) // len(layout.lengths)  # virtual rows in front of each example
        rows = PackedLayout([n + P_in for n in layout.lengths]) if P_in else layout
        pos = rows.positions(P - P_in, idx.device)  # (L + N * P_in,): each example from 0 (or P)
        if self.config.position_embedding == "learned":
            x = x + self.transformer.wpe(pos)
            cos = sin = None
        else:
            cos, sin = self.rope_cache(idx.device, P + longest)
            cos, sin = cos.index_select(0, pos), sin.index_select(0, pos)  # (L + N * P_in, hs)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, None, rows, use_reentrant=False)
            else:
                x = block(x, cos, sin, None, rows)
        if P_in:  # the real tokens only, in their packed order
            x = torch.cat([x_i[:, P_in:] for x_i in rows.split(x, 1)], dim=1)  # (1, L, n_embd)
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.output_logits(x)

    def positions_seen(self, input_pos: torch.Tensor) -> int:
        """The sequence length a decoding step has seen, ``max(input_pos) + 1``; only dynamic NTK asks for it (a
        device sync), every other table is fixed."""
        scaling = self.config.rope_scaling
        return int(input_pos.max()) + 1 if scaling and scaling["rope_type"] == "dynamic" else 0

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head: final normalized states ``(..., n_embd)`` to logits ``(..., vocab_size)``."""
        if self.lm_head is None:
            raise UserError("an encoder (causal=false) has no language-model head: it classifies "
                            "(finetune/classify.py <method>)")
        logits = self.lm_head(x)  # (..., padded_vocab_size)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None) -> None:
        P = self.num_virtual_tokens
        max_seq_length = (max_seq_length or self.config.block_size - P) + P  # the virtual tokens' slots come first
        if max_seq_length > self.config.block_size:
            size = f"{max_seq_length - P} tokens and {P} virtual tokens" if P else f"{max_seq_length}"
            raise UserError(f"KV cache of {size} exceeds block_size={self.config.block_size}")
        reference = self.transformer.wte.weight
        device = device or reference.device
        dtype = dtype or (reference.dtype if reference.is_floating_point() else torch.float32)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation as in HF ``LlamaForCausalLM``: N(0, std) for linear and embedding weights, zero
        biases, unit norm weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.norm_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, block_idx)
        self.norm_2 = build_norm(config)
        self.mlp = GptNeoxMLP(config) if config.mlp_class == "GptNeoxMLP" else LLaMAMLP(config)
        self.post_norm = config.norm_placement == "post"
        self.dropout = config.hidden_dropout  # an encoder's, on each sublayer's output (HF's hidden dropout)
        # hook slots (module docstring): a method's module on a sublayer's output, or on the block's
        self.attn_adapter: Optional[nn.Module] = None
        self.mlp_adapter: Optional[nn.Module] = None
        self.out_adapter: Optional[nn.Module] = None

    def forward(
        self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor] = None, packed: Optional[PackedLayout] = None,
        key_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``key_mask`` ``(B, S)``: an encoder's keys to attend to (bidirectionally); None for a decoder."""
        if self.post_norm:  # BERT/RoBERTa: the residual sum is normalized, x = norm(x + sublayer(x))
            h = F.dropout(self.attn(x, cos, sin, input_pos, packed, key_mask), self.dropout, self.training)
            x = self.norm_1(x + (h if self.attn_adapter is None else self.attn_adapter(h)))
            h = F.dropout(self.mlp(x), self.dropout, self.training)
            x = self.norm_2(x + (h if self.mlp_adapter is None else self.mlp_adapter(h)))
            return x if self.out_adapter is None else self.out_adapter(x)
        h = self.attn(self.norm_1(x), cos, sin, input_pos, packed, key_mask)  # (B, T, n_embd)
        x = x + (h if self.attn_adapter is None else self.attn_adapter(h))
        h = self.mlp(self.norm_2(x))
        x = x + (h if self.mlp_adapter is None else self.mlp_adapter(h))
        return x if self.out_adapter is None else self.out_adapter(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.config = config
        self.block_idx = block_idx
        hs, kv_dim = config.head_size, config.n_query_groups * config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None
        # ``None`` is dense causal attention; a sparse pattern (lit_adapter.model.attention) replaces it.
        self.attention_kernel: Optional[nn.Module] = None
        # the attention hook slot (module docstring): a method's module that computes this layer's attention
        self.adapter: Optional[nn.Module] = None
        # an encoder's keys to attend to, (B, S), for the duration of its forward: the hooks call
        # scaled_dot_product_attention / content_mask with the signature decoders use, and read it there
        self.key_mask: Optional[torch.Tensor] = None

    def forward(
        self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor] = None, packed: Optional[PackedLayout] = None,
        key_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        self.key_mask = key_mask
        try:
            return self._forward(x, cos, sin, input_pos, packed)
        finally:
            self.key_mask = None  # never read by a later forward (nor kept alive)

    def _forward(
        self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor], packed: Optional[PackedLayout],
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, ng, hs = self.config.n_head, self.config.n_query_groups, self.config.head_size
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = self.v_proj(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        if cos is not None:  # rotary positions (learned ones were added to the embeddings)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache is set; call model.set_kv_cache() first")
            k, v = self.kv_cache(input_pos, k, v)  # (B, ng, S, hs)
        # k and v stay grouped (B, ng, S, hs): SDPA's enable_gqa reads each group for its query heads, so neither
        # training nor the KV cache pays a repeat_interleave copy of nh / ng times the keys and values

        if packed is not None:  # several examples in the row: each attends inside itself
            y = packed.attend(self, q, k, v)  # (1, nh, T, hs)
        elif self.adapter is not None:
            y = self.adapter(self, q, k, v, input_pos)  # (B, nh, T, hs)
        else:
            y = self.scaled_dot_product_attention(q, k, v, input_pos)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)
        return self.o_proj(y)

    def scaled_dot_product_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Causal attention of ``q`` (B, nh, T, hs) over ``k``, ``v`` (B, ng, S, hs), dense or ``attention_kernel``'s.

        Without ``input_pos`` query ``i`` sits at position ``i`` and S == T. With it, the queries sit at
        ``input_pos`` and the keys are the whole KV cache (positions ``0..S-1``, unwritten slots masked out).
        """
        if self.attention_kernel is not None:
            return self.attention_kernel(q, k, v, input_pos)
        if not self.config.causal:  # an encoder: both ways, over the keys that are not padding
            return attend(q, k, v, attn_mask=self.content_mask(q, k.shape[-2]),
                          dropout_p=self.config.attention_dropout if self.training else 0.0)
        if input_pos is None:
            return attend(q, k, v, is_causal=True)
        mask = causal_mask_for_positions(input_pos, k.shape[-2])  # (T, S)
        key_valid = getattr(self.kv_cache, "key_valid", None)  # (B, S): False at a left-padded batch's padding
        if key_valid is not None:
            # a padded query would see no key at all (a NaN row): it keeps its own slot, which no real token reads
            own = torch.arange(k.shape[-2], device=q.device)[None, :] == input_pos[:, None]
            mask = mask & (key_valid[:, None, None, :] | own)  # (B, 1, T, S)
        return attend(q, k, v, attn_mask=mask)

    def content_mask(self, q: torch.Tensor, S: int, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Which of the ``S`` keys of the sequence each of the ``T`` queries ``q`` (B, nh, T, hs) sees: causally
        ``(T, S)``, or an encoder's padding mask ``(B, 1, 1, S)``. A hook that adds keys of its own (prefix tuning)
        puts them in front."""
        if not self.config.causal:
            return key_mask_for_attention(self.key_mask)
        if input_pos is None:
            return torch.ones(q.shape[-2], S, dtype=torch.bool, device=q.device).tril()
        return causal_mask_for_positions(input_pos, S)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of ``q`` (B, nh, T, hs) over grouped ``k``, ``v`` (B, ng, S, hs).

    With ``enable_gqa`` the fused kernels (CPU flash, checked forward and backward in tests/test_hot_path.py; CUDA
    flash) read each key/value head for the nh / ng query heads of its group, so no repeated copy is made or kept
    for backward (a backend without grouping repeats inside SDPA, not here); with ng == nh it is plain SDPA.
    """
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[-3] != q.shape[-3], **kwargs)


def causal_mask_for_positions(input_pos: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Boolean (T, S) mask: query at ``input_pos[t]`` may see key positions ``<= input_pos[t]``."""
    kv_pos = torch.arange(kv_length, device=input_pos.device)
    return kv_pos[None, :] <= input_pos[:, None]


class LLaMAMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GptNeoxMLP(nn.Module):
    """GPT-2's feed-forward: ``down(gelu(up(x)))`` (HF's ``c_fc`` and ``c_proj``), with biases when ``bias``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))  # (..., n_embd)


def build_norm(config: Config) -> nn.Module:
    """The ``norm_class`` of ``config``: RMSNorm (LLaMA) or LayerNorm with a bias (GPT-2)."""
    if config.norm_class == "LayerNorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, eps=config.norm_eps)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 like the reference."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_length: int, config: Config, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # (B, S) bool, set by batched generation: which slots hold real tokens (None: all of them)
        self.key_valid: Optional[torch.Tensor] = None

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Writes ``k``, ``v`` (B, ng, T, hs) at ``input_pos`` and returns the whole cache (B, ng, S, hs)."""
        B = k.shape[0]
        self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:B], self.v[:B]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, nh, T, hs) by position; pairs are (i, i + hs/2) ("rotate half")."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x.float() * cos + rotated.float() * sin
    return out.to(x.dtype)


def num_parameters(module: nn.Module, requires_grad: Optional[bool] = None) -> int:
    """Counts parameters once each (tied weights are shared), optionally only (non-)trainable ones."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (requires_grad is not None and p.requires_grad != requires_grad):
            continue
        seen.add(id(p))
        total += p.numel() if not hasattr(p, "quant_state") else math.prod(getattr(p.quant_state, "shape", p.shape))
    return total
