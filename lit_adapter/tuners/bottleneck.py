"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
https://arxiv.org/abs/1902.00751, and Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning", https://arxiv.org/abs/2005.00247. Semantics follow AdapterHub's ``adapters`` library
(``DoubleSeqBnConfig`` for Houlsby, ``SeqBnConfig`` for Pfeiffer) on its LLaMA integration.

A bottleneck adapter maps a hidden state ``x`` (n_embd wide) to ``x + scaling * up(act(down(x)))``: ``down`` and
``up`` are affine maps through ``r << n_embd`` units (``r = n_embd // reduction_factor``, or ``bottleneck_size``).
Only the adapters train. Where they sit in a pre-norm LLaMA block ``x -> x + attn(norm_1(x)) -> ... + mlp(...)``:

* ``houlsby``: two adapters per layer, on the attention output and on the MLP output, each *before* the residual
  add: ``x2 = x + A1(attn(norm_1(x)))``, ``out = x2 + A2(mlp(norm_2(x2)))``. This is AdapterHub's
  ``original_ln_before=False, residual_before_ln=True`` with no layer norm handed to the adapter layer (its LLaMA
  layer passes ``None``), so the adapter's own skip connection carries the sublayer output and the block's residual
  is added after it.
* ``pfeiffer``: one adapter per layer after the MLP. AdapterHub's ``original_ln_before=True`` adds the block's
  residual to the MLP output *before* the adapter, which then reads ``x3 = x2 + mlp(norm_2(x2))`` and returns
  ``x2 + mlp(...) + up(act(down(x3)))``, i.e. ``out = A(x3)``: the adapter acts on the block's output.

The adapters sit in the block's hook slots (:mod:`lit_adapter.model.gpt`): ``Block.attn_adapter`` and
``Block.mlp_adapter`` transform the attention's and the MLP's output before the residual add (``houlsby``),
``Block.out_adapter`` the block's output (``pfeiffer``); the tensors are ``transformer.h.<i>.attn_adapter.down_weight``
and so on. Nothing of the base is wrapped or renamed, so base checkpoints load as they are, a quantized base
(``--quantize``) keeps its adapters (they are not the linears bitsandbytes replaces), and sparse attention kernels,
gradient checkpointing and the KV cache are unaffected. The adapters' own affine maps are plain parameters, not
``nn.Linear``, so quantization leaves them alone.

AdapterHub initialises adapters with ``init_weights="bert"`` (normal weights of std 0.02, zero biases): near the
identity, not exactly it. ``houlsby`` is the paper's near-identity (std 0.01, cut at 2 std), and ``mam_adapter``
(Kaiming-uniform ``down``, zero ``up``) is exactly the base model at initialisation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Literal, Optional, Tuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, Saved, dropout
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.base import Method, TunerLayer

SLOTS = {"attn": "attn_adapter", "mlp": "mlp_adapter", "block": "out_adapter"}
"""The block's hook slot (``lit_adapter.model.gpt.Block``) of each site an adapter can act on."""

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # AdapterHub's names (transformers' get_activation): "swish" is SiLU, "gelu_new" the tanh approximation
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "leakyrelu": F.leaky_relu,
}


def bottleneck_width(n_embd: int, reduction_factor: float, size: Optional[int] = None) -> int:
    """A bottleneck adapter's hidden width: ``size``, else AdapterHub's ``int(n_embd // reduction_factor)``, >= 1."""
    return size if size is not None else max(1, int(n_embd // reduction_factor))


Activation = Literal["relu", "gelu", "gelu_new", "swish", "silu", "tanh", "leakyrelu"]
Init = Literal["bert", "houlsby", "mam_adapter"]


@dataclass
class BottleneckConfig:
    """Bottleneck adapter settings (AdapterHub's ``BnConfig`` fields that apply to a pre-norm LLaMA)."""

    reduction_factor: float = 16.0
    """The adapter's hidden width is n_embd // reduction_factor (at least 1); below 1 the adapter widens."""
    bottleneck_size: Optional[int] = None
    """The adapter's hidden width; overrides reduction_factor when set."""
    non_linearity: Activation = "swish"
    """Activation between the down and up projection (AdapterHub's names; swish = silu)."""
    init_weights: Init = "bert"
    """Initialisation: bert (AdapterHub's default: normal weights of std 0.02, zero biases), houlsby (normal weights
    of std 0.01 cut at 2 std, zero biases) or mam_adapter (Kaiming-uniform down, zero up: exactly the base model)."""
    scaling: float = 1.0
    """Factor on the adapter's output before its skip connection (He et al. 2021's scaled addition)."""
    dropout: float = 0.0
    """Dropout on the adapter's output before its skip connection (training only)."""
    leave_out: List[int] = field(default_factory=list)
    """Layers (from 0) that get no adapter."""

    def __post_init__(self) -> None:
        if not self.reduction_factor > 0:
            raise UserError(f"bottleneck reduction_factor must be > 0, got {self.reduction_factor!r}")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"bottleneck bottleneck_size must be an integer >= 1, got {size!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise UserError(f"bottleneck non_linearity {self.non_linearity!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.init_weights not in get_args(Init):
            raise UserError(f"bottleneck init_weights {self.init_weights!r} is not one of {', '.join(get_args(Init))}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"bottleneck dropout must be in [0, 1), got {self.dropout!r}")
        self.leave_out = sorted(set(self.leave_out))

    def width(self, n_embd: int) -> int:
        return bottleneck_width(n_embd, self.reduction_factor, self.bottleneck_size)


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby adapters: AdapterHub's ``DoubleSeqBnConfig`` defaults (reduction 16, swish)."""

    non_linearity: Activation = "swish"
    """Activation between the down and up projection (AdapterHub's names; swish = silu)."""


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer adapters: AdapterHub's ``SeqBnConfig`` defaults (reduction 16, relu)."""

    non_linearity: Activation = "relu"
    """Activation between the down and up projection (AdapterHub's names; swish = silu)."""


class BottleneckAdapter(TunerLayer):
    """``x + dropout(scaling * (up_weight @ act(down_weight @ x + down_bias) + up_bias))`` over the last dim.

    ``peft_enabled`` False (``tuners.base.switched_off``): the adapter returns its input.
    """

    def __init__(self, size: int, width: int, settings: BottleneckConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.size, self.width = size, width
        self.non_linearity = settings.non_linearity
        self.init_weights = settings.init_weights
        self.scaling = settings.scaling
        self.down_weight = nn.Parameter(torch.empty(width, size, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.up_weight = nn.Parameter(torch.empty(size, width, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.reset_peft_parameters()

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """AdapterHub's initialisations (``init_weights``); on the meta device this does nothing."""
        self.materialize()
        if self.init_weights == "bert":
            nn.init.normal_(self.down_weight, std=0.02)
            nn.init.normal_(self.up_weight, std=0.02)
        elif self.init_weights == "houlsby":
            for weight in (self.down_weight, self.up_weight):
                nn.init.trunc_normal_(weight, std=1e-2, a=-2e-2, b=2e-2)
        else:  # mam_adapter
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.down_bias)
        nn.init.zeros_(self.up_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.peft_enabled:
            return x
        h = x.to(self.down_weight.dtype)
        up = F.linear(ACTIVATIONS[self.non_linearity](F.linear(h, self.down_weight, self.down_bias)),
                      self.up_weight, self.up_bias)  # (..., size)
        if self.scaling != 1.0:  # multiplying by 1 would change nothing but cost a copy
            up = up * self.scaling
        return x + self.dropout(up).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.size} -> {self.width} -> {self.size}, {self.non_linearity}, scaling={self.scaling}"

    fold_label = "bottleneck adapters"
    """An export into plain LLaMA weights asks :meth:`fold_refusal` (``tuners.base.FoldAnswer``)."""

    def fold_refusal(self) -> Optional[str]:
        return ("are extra down/up projections on a block's attention or MLP output (AdapterHub's), layers "
                "LlamaForCausalLM does not have")


def add_bottleneck_adapters(model: GPT, settings: BottleneckConfig, sites: Tuple[str, ...]) -> None:
    """Sets a :class:`BottleneckAdapter` into each block's slot of each of ``sites`` (``attn``, ``mlp``, ``block``),
    except in the ``leave_out`` layers; in place.

    The adapters are created on the device and in the dtype of the token embedding (the meta device while the
    model is built), which a quantized base keeps in floating point (an encoder has no final norm).
    """
    reference = model.transformer.wte.weight
    width = settings.width(model.config.n_embd)
    for i, block in enumerate(model.transformer.h):
        if i in settings.leave_out:
            continue
        for site in sites:
            if getattr(block, SLOTS[site]) is not None:
                raise RuntimeError("the model already has bottleneck adapters")
            adapter = BottleneckAdapter(model.config.n_embd, width, settings, device=reference.device,
                                        dtype=reference.dtype)
            setattr(block, SLOTS[site], adapter)


@dataclass(frozen=True)
class BottleneckMemoryTerms(MemoryTerms):
    """What an adapter ``x + scaling * up(act(down(x)))`` keeps on the sublayer outputs at ``sites``: its weights'
    gradients need ``x`` and ``act(down(x))``; relu and tanh compute theirs from that output, the other
    activations keep their input too; dropout keeps its mask."""

    sites: Tuple[str, ...] = ()
    """``attn`` and ``mlp`` (that sublayer's output before the residual add) or ``block`` (the block's output)."""
    size: Optional[int] = None
    reduction_factor: float = 16.0
    activation: str = ""
    dropout: float = 0.0
    leave_out: Tuple[int, ...] = ()

    def sublayer_output(self, saved: Saved, site: str, x: str, layer: int, dims: Dims) -> bool:
        if site not in self.sites or layer in self.leave_out:
            return False
        N, d = dims.N, dims.d
        r = bottleneck_width(dims.C, self.reduction_factor, self.size)
        name = f"{site}.bottleneck"
        saved.add(x, N * dims.C * d)
        saved.add(f"{name}.act", N * r * d)
        if self.activation not in ("relu", "tanh"):
            saved.add(f"{name}.down", N * r * d)
        if self.dropout > 0:
            dropout(saved, name, True, N * dims.C, dims)
        return True


class _Bottleneck(Method):
    """What Houlsby and Pfeiffer share; they differ in where the adapters sit (``sites``) and the defaults."""

    sites: ClassVar[Tuple[str, ...]]
    # the rate AdapterFusion (Pfeiffer et al. 2021) trains its adapters with; Houlsby et al. sweep 3e-5 to 3e-3
    train_defaults = {"learning_rate": 1e-4}
    trained_names = tuple(SLOTS.values())
    added_names = trained_names

    def current_name(self, name: str) -> str:
        """Runs before the adapters moved into the block's hook slots saved them as ``h.N.attn.bottleneck.*``,
        ``h.N.mlp.bottleneck.*`` and ``h.N.bottleneck.*``; they are ``h.N.{attn,mlp,out}_adapter.*`` now."""
        return re.sub(r"(\.h\.\d+)\.(?:(attn|mlp)\.)?bottleneck\.",
                      lambda m: f"{m.group(1)}.{SLOTS[m.group(2) or 'block']}.", name)

    def validate(self, settings: BottleneckConfig, config: Config) -> None:
        outside = [i for i in settings.leave_out if not 0 <= i < config.n_layer]
        if outside:
            raise UserError(f"{self.name} leave_out={outside} names layers the model lacks (n_layer={config.n_layer})")
        if len(settings.leave_out) == config.n_layer:
            raise UserError(f"{self.name} leave_out covers all {config.n_layer} layers: nothing would train")

    no_peft = "its bottleneck adapters are AdapterHub's, not a PEFT adapter type"

    def attach(self, model: GPT, settings: BottleneckConfig) -> None:
        add_bottleneck_adapters(model, settings, self.sites)

    def memory_terms(self, settings: BottleneckConfig) -> BottleneckMemoryTerms:
        return BottleneckMemoryTerms(sites=self.sites, size=settings.bottleneck_size,
                                     reduction_factor=settings.reduction_factor, activation=settings.non_linearity,
                                     dropout=settings.dropout, leave_out=tuple(settings.leave_out))


class Houlsby(_Bottleneck):
    name = "houlsby"
    summary = ("Fine-tune a frozen LLaMA with Houlsby bottleneck adapters (Houlsby et al. 2019): x + up(act(down(x))) "
               "on the attention and on the MLP output of every layer, before the residual add (AdapterHub's "
               "double_seq_bn).")
    settings_cls = HoulsbyConfig
    settings_group = "houlsby"
    sites = ("attn", "mlp")


class Pfeiffer(_Bottleneck):
    name = "pfeiffer"
    summary = ("Fine-tune a frozen LLaMA with Pfeiffer bottleneck adapters (Pfeiffer et al. 2021): x + "
               "up(act(down(x))) once per layer, after the MLP and its residual add (AdapterHub's seq_bn).")
    settings_cls = PfeifferConfig
    settings_group = "pfeiffer"
    sites = ("block",)


HOULSBY = Houlsby()
PFEIFFER = Pfeiffer()
