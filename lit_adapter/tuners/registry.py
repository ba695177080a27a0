"""The method registry and what every method's life shares: build, load, train-filter, save and reload.

Methods are looked up by name in :data:`REGISTRY`; each is a :class:`~lit_adapter.tuners.base.Method` declared in
its own module under ``lit_adapter/tuners/``. Nothing here (or anywhere else) branches on a method's name: adding a
method means writing its module, its test and its line below.

A run is described by a :class:`MethodSpec`: the method, its hyper-parameters, the attention pattern and the
quantization of the frozen base. From it come the model (:func:`prepare_model`: built on the meta device, base
weights loaded, the method's new tensors initialised, attention applied, base quantized, trainable tensors
marked), the filter of what trains and is saved (:func:`trainable_filter`), and the small ``final/`` folder of a
finished run (:func:`save_adapter`, :func:`load_finetuned`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.model.attention import AttentionConfig, apply_attention
from lit_adapter.checkpoint import atomic_write, check_keys, find_weights, load_state_dict, load_weights_into, \
    save_state_dict, to_model_keys
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model.heads import HeadSpec, attach_head, is_head_tensor
from lit_adapter.model.gpt import GPT, num_parameters
from lit_adapter.model.quantize import QUANTIZE_MODES, default_skip, quantize_linears
from lit_adapter.data.tokenizer import tokenizer_files
from lit_adapter.tuners.base import Method, initialize_tuner_layers


def discover_methods() -> Dict[str, Method]:
    """Every :class:`Method` instance a module under ``lit_adapter/tuners/`` defines at its top level (its
    ``METHOD``, or several: bottleneck's ``HOULSBY`` and ``PFEIFFER``), by name in alphabetical order. Adding a
    method is writing its module: no list here to extend."""
    import importlib
    import pkgutil

    from lit_adapter import tuners

    found: Dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(tuners.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{tuners.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Method):
                if found.setdefault(value.name, value) is not value:
                    raise RuntimeError(f"two methods are named {value.name!r}: {found[value.name]!r}, {value!r}")
    return dict(sorted(found.items()))


REGISTRY: Dict[str, Method] = discover_methods()
METHODS = tuple(REGISTRY)
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


@dataclass
class MethodSpec:
    method: str
    settings: Any = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    quantize: Optional[str] = None
    head: Optional[HeadSpec] = None
    """A sequence-classification head on top (``lit_adapter.model.heads``); it trains and is saved with the method."""

    def __post_init__(self) -> None:
        definition = self.definition  # an unknown name fails here
        if self.settings is None:
            self.settings = definition.default_settings()
        if isinstance(self.settings, dict):
            self.settings = definition.settings_cls(**self.settings)
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.head, dict):
            self.head = HeadSpec(**self.head)

    @property
    def definition(self) -> Method:
        return get_method(self.method)

    def validate(self, config: Config) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UserError(f"unknown quantize mode {self.quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
        if self.quantize is not None and not self.definition.trains_quantized_base:
            raise UserError(f"{self.method} trains the base weights, which cannot be quantized; "
                            "use lora with --quantize (QLoRA)")
        if not config.causal:  # an encoder (RoBERTa): what assumes a decoder is refused here, in one line
            if self.definition.decoder_only:
                raise UserError(f"{self.method} cannot run on the encoder {config.name or ''}: "
                                f"{self.definition.decoder_only}".replace("  ", " "))
            if self.attention.pattern != "dense":
                raise UserError(f"--attention.pattern {self.attention.pattern} is a causal pattern; an encoder "
                                "(causal=false) attends densely both ways")
        self.definition.validate(self.settings, config)

    def check_shardable(self) -> None:
        """Raises one :class:`UserError` line when this method, with these settings, cannot train under
        ``--fabric.strategy fsdp`` on several processes (the method answers, :meth:`Method.shard_refusal`)."""
        if self.quantize == "bnb.int8":
            raise UserError("--quantize bnb.int8 with --fabric.strategy fsdp: LLM.int8()'s weights and row scales "
                            "are not sharded (sharded QLoRA is 4-bit: bnb.nf4, bnb.nf4-dq, bnb.fp4); use a 4-bit "
                            "mode, or --fabric.strategy ddp")
        reason = self.definition.shard_refusal(self.settings)
        if reason:
            raise UserError(f"{self.method} with --fabric.strategy fsdp: {reason}")

    def describe(self) -> str:
        name = self.method
        if self.attention.pattern != "dense":
            name += f"+{self.attention.pattern}"
        if self.quantize:
            name += f" ({self.quantize})"
        if self.head is not None:
            name += f" + {self.head.num_labels}-way head"
        return name

    def to_dict(self) -> Dict[str, Any]:
        out = {
            "method": self.method,
            "settings": asdict(self.settings) if self.settings is not None else None,
            "attention": asdict(self.attention),
            "quantize": self.quantize,
        }
        if self.head is not None:  # absent otherwise, so a run without a head records what it always did
            out["head"] = asdict(self.head)
        return out


def resolve_config(checkpoint_dir: Optional[Path], model_name: Optional[str]) -> Config:
    if checkpoint_dir is not None:
        return Config.from_checkpoint_dir(checkpoint_dir)
    if model_name is not None:
        return Config.from_name(model_name)
    raise UserError("pass --checkpoint_dir (a converted checkpoint) or, for --dry_run, --model_name")


def trainable_filter(spec: MethodSpec) -> Callable[[str, Any], bool]:
    """``filter(name, param)``: which tensors train under the spec's settings, and so which are checkpointed (a
    head's too)."""
    definition, settings = spec.definition, spec.settings
    method = lambda name, param=None: definition.trainable(name, param, settings)  # noqa: E731
    if spec.head is None:
        return method
    return lambda name, param=None: is_head_tensor(name) or method(name, param)


def is_added(spec: MethodSpec) -> Callable[[str], bool]:
    """Which tensors ``spec`` adds to the base (initialised, not loaded): the method's and a head's."""
    if spec.head is None:
        return spec.definition.is_added
    return lambda name: is_head_tensor(name) or spec.definition.is_added(name)


def build_model(spec: MethodSpec, config: Config) -> GPT:
    """The model of ``spec`` on the current default device (use ``torch.device("meta")`` to allocate nothing)."""
    model = spec.definition.build(config, spec.settings)
    apply_attention(model, spec.attention)
    if spec.head is not None:
        attach_head(model, spec.head)
    return model


def unquantized(spec: MethodSpec) -> Callable[[str], bool]:
    """Which linear layers (by qualified name) stay unquantized on a quantized base: the head, and the layers the
    method adds (an adapter's own projections train, so they must stay floating-point)."""
    return lambda name: default_skip(name) or is_added(spec)(name)


def mark_trainable(model: nn.Module, spec: MethodSpec) -> None:
    keep = trainable_filter(spec)
    for name, param in model.named_parameters():
        param.requires_grad = bool(keep(name, param)) and param.is_floating_point()


def count_parameters(model: nn.Module, requires_grad: Optional[bool] = None) -> int:
    return num_parameters(model, requires_grad=requires_grad)


def dry_run(spec: MethodSpec, config: Config) -> Tuple[int, int]:
    """Prints the trainable and total parameter counts of ``spec`` on ``config`` and the trainable share of the
    total, without allocating weights."""
    with torch.device("meta"):
        model = build_model(spec, config)
    mark_trainable(model, spec)
    trainable, total = count_parameters(model, requires_grad=True), count_parameters(model)
    print(f"model: {config.name or 'custom'} ({spec.describe()})")
    print(f"trainable parameters: {trainable}")
    print(f"total parameters: {total}")
    print(f"trainable share: {format_share(trainable, total)}")
    return trainable, total


def format_share(part: int, whole: int) -> str:
    """``part`` as a percentage of ``whole`` with two decimals (``"0.02%"``), as ``--dry_run`` prints it."""
    return f"{100 * part / whole:.2f}%"


def _match_base_names(
    state_dict: Dict[str, torch.Tensor], model_keys: set, config: Config
) -> Dict[str, torch.Tensor]:
    """Base checkpoints name ``...q_proj.weight``; PEFT wrappers hold it as ``...q_proj.linear.weight``."""
    if config.tie_embeddings and "lm_head.linear.weight" in model_keys and "lm_head.weight" not in state_dict:
        # a tied checkpoint stores the head once, as the embedding; the wrapped head must still receive it
        state_dict = {**state_dict, "lm_head.weight": state_dict.get("transformer.wte.weight")}
    return to_model_keys(state_dict, model_keys)


def _materialize_new_parameters(model: nn.Module, device: torch.device) -> None:
    """Gives the PEFT tensors that no checkpoint filled (still on meta) their initial values on ``device``: every
    method module's (:class:`~lit_adapter.tuners.base.TunerLayer`) by its own initialiser, a plain torch layer's
    outside them (a classification head) by its ``reset_parameters``."""
    initialize_tuner_layers(model, device, only_meta=True)
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if any(t.is_meta for _, t in own):
            if not hasattr(module, "reset_parameters"):
                raise RuntimeError(f"{type(module).__name__} has uninitialised tensors and no initialiser")
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()


def prepare_model(
    spec: MethodSpec, config: Config, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
    sharded: bool = False,
) -> GPT:
    """Builds ``spec``'s model with the base weights of ``checkpoint_dir``, ready to train or evaluate. ``sharded``
    (``--fabric.strategy fsdp``): a 4-bit base packs its weights in ``dtype`` so that FSDP2 can shard them
    (``quantize.quantize_linears``' ``quant_storage``)."""
    with torch.device("meta"):
        model = build_model(spec, config)
    state_dict = load_state_dict(find_weights(checkpoint_dir))
    model_keys = set(model.state_dict())
    state_dict = _match_base_names(state_dict, model_keys, config)
    load_weights_into(model, state_dict, allow_missing=is_added(spec), source=str(checkpoint_dir))
    _materialize_new_parameters(model, torch.device("cpu"))
    spec.definition.initialize_from_base(model, spec.settings, Path(checkpoint_dir))
    model = model.to(dtype=dtype)
    # Quantize layer by layer on the way to the device, so the full-precision base never sits on the GPU at once.
    quantize_linears(model, spec.quantize, device=torch.device(device), compute_dtype=dtype, skip=unquantized(spec),
                     quant_storage=dtype if sharded else torch.uint8)
    model = model.to(device=device)
    if spec.quantize is not None:
        spec.definition.initialize_after_quantization(model, spec.settings)
    mark_trainable(model, spec)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper (whose parameter names carry a ``_forward_module.`` prefix)."""
    from lightning.fabric.wrappers import _FabricModule

    return model.module if isinstance(model, _FabricModule) else model


def save_adapter(model: nn.Module, spec: MethodSpec, config: Config, checkpoint_dir: Path, out_dir: Path,
                 record: Optional[Dict[str, Any]] = None) -> Path:
    """Writes the trained tensors and what is needed to rebuild the model around them into ``out_dir``.

    PEFT methods write ``adapter.safetensors`` (only the trainable tensors: kilobytes to megabytes) and
    ``adapter_config.json``; a method whose ``final_is_checkpoint`` (full fine-tuning) writes a complete checkpoint
    folder (weights, config, tokenizer) beside it. ``record`` adds entries to ``adapter_config.json`` (a chat
    run's template).
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = spec.definition.final_is_checkpoint
    if whole:
        tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_state_dict(tensors, out_dir / "lit_model.safetensors")
        config.save(out_dir / "model_config.json")
        for file in tokenizer_files(checkpoint_dir):  # tokenizer.model, or a BPE tokenizer's files
            shutil.copyfile(file, out_dir / file.name)
    else:
        tensors, settings = spec.definition.final_tensors(model, spec.settings)  # a reparameterisation folded away
        if spec.head is not None:  # a classification head trains with every method and is saved with it
            tensors.update({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if is_head_tensor(n)})
        spec = replace(spec, settings=settings)
        atomic_write(out_dir / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    meta = {**spec.to_dict(), "base_checkpoint_dir": str(checkpoint_dir), "base_config": asdict(config),
            "rope_scaling": config.rope_scaling,  # the run's window: load_finetuned rebuilds it
            "trainable_params": None if whole else sum(t.numel() for t in tensors.values()), **(record or {})}
    atomic_write(out_dir / ADAPTER_CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return out_dir


def save_adapter_folder(model: nn.Module, spec: MethodSpec, config: Config, checkpoint_dir: Path,
                        out_dir: Path, record: Optional[Dict[str, Any]] = None) -> Path:
    """:func:`save_adapter` into a temporary folder that then replaces ``out_dir`` whole, so a reader (or a crash)
    never sees a mix of two saves."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    save_adapter(model, spec, config, checkpoint_dir, tmp, record)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def read_spec(adapter_dir: Path) -> Tuple[MethodSpec, Dict[str, Any]]:
    """The :class:`MethodSpec` recorded in a run's ``final/adapter_config.json``; a broken file is one line."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not a fine-tuned output: {ADAPTER_CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); the run's final/ folder is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise UserError(f"{path} does not say which method trained it (no \"method\" field)")
    settings_cls = get_method(meta["method"]).settings_cls
    settings = None
    try:
        if settings_cls is not None:
            known = {f.name for f in fields(settings_cls)}
            settings = settings_cls(**{k: v for k, v in (meta.get("settings") or {}).items() if k in known})
        attention = AttentionConfig(**(meta.get("attention") or {}))
        head = HeadSpec(**meta["head"]) if meta.get("head") else None
    except (TypeError, AttributeError) as err:
        raise UserError(f"{path}: its settings do not fit {meta['method']} ({err})") from None
    return MethodSpec(meta["method"], settings, attention, meta.get("quantize"), head), meta


def load_finetuned(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path],
    device: torch.device,
    dtype: torch.dtype,
    quantize: Optional[str] = None,
    rope_scaling: Optional[Dict[str, Any]] = None,
    attention: Optional[AttentionConfig] = None,
) -> Tuple[Config, GPT, MethodSpec]:
    """The base of ``checkpoint_dir`` with the fine-tuned tensors of ``adapter_dir`` (``None``: the base alone).

    ``quantize``: ``None`` loads the base as the fine-tune was trained (the quantization its adapter_config.json
    records), ``"none"`` in full precision, a mode in that mode; a choice that differs from the training is said in
    one line on stderr. The model gets the RoPE scaling the run recorded (the window it was trained for);
    ``rope_scaling`` (``--model.rope_scaling``) replaces it, with a note when it differs from the recorded one.
    ``attention`` replaces the recorded attention pattern (LongLoRA trains with shifted sparse attention and
    evaluates with dense attention).
    """
    if adapter_dir is None:
        spec = MethodSpec("full", quantize=None if quantize == "none" else quantize,
                          attention=attention or AttentionConfig())
        config = Config.from_checkpoint_dir(checkpoint_dir).with_rope_scaling(rope_scaling)
        return config, prepare_model(spec, config, checkpoint_dir, device, dtype).eval(), spec
    spec, meta = read_spec(adapter_dir)
    spec.quantize = _quantization_for(spec.quantize, quantize, adapter_dir)
    spec.attention = attention or spec.attention
    if spec.definition.final_is_checkpoint:  # its model_config.json is the run's, scaling included
        config = _run_window(Config.from_checkpoint_dir(adapter_dir), None, rope_scaling, adapter_dir)
        return config, prepare_model(spec, config, adapter_dir, device, dtype).eval(), spec
    config = _run_window(Config.from_checkpoint_dir(checkpoint_dir), meta.get("rope_scaling"), rope_scaling,
                         adapter_dir)
    spec.validate(config)
    model = prepare_model(spec, config, checkpoint_dir, device, dtype)
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"adapter weights not found: {path}")
    load_trained_tensors(model, load_state_dict(path), spec, source=str(path))
    spec.definition.prepare_for_inference(model)
    return config, model.eval(), spec


def _quantization_for(trained: Optional[str], asked: Optional[str], adapter_dir: Path) -> Optional[str]:
    import sys

    if asked is None:
        if trained is not None:
            print(f"note: loading the base in {trained}, as {adapter_dir} was trained (--quantize none loads it in "
                  "full precision)", file=sys.stderr)
        return trained
    chosen = None if asked == "none" else asked
    if chosen != trained:
        print(f"note: {adapter_dir} was trained on a {trained or 'full-precision'} base; loading it "
              f"{'in full precision' if chosen is None else 'in ' + chosen} as asked", file=sys.stderr)
    return chosen


def _run_window(config: Config, recorded: Optional[Dict[str, Any]], requested: Optional[Dict[str, Any]],
                adapter_dir: Path) -> Config:
    """The base config with the run's recorded RoPE scaling, or the one requested for this evaluation."""
    trained = config.with_rope_scaling(recorded)
    if requested is None:
        return trained
    wanted = trained.with_rope_scaling(requested)
    if wanted.rope_scaling != trained.rope_scaling:
        import sys

        print(f"note: {adapter_dir} was fine-tuned for a window of {trained.describe_window()}; evaluating it with "
              f"{wanted.describe_window()} as --model.rope_scaling asks", file=sys.stderr)
    return wanted


def load_trained_tensors(model: nn.Module, tensors: Dict[str, torch.Tensor], spec: MethodSpec, source: str) -> None:
    """Copies saved trainable tensors into ``model``; a clear error names the keys when they do not fit."""
    keep = trainable_filter(spec)
    params = {n: p for n, p in model.named_parameters() if keep(n, p)}
    tensors = {spec.definition.current_name(name): t for name, t in tensors.items()}  # older runs' names
    check_keys(params, tensors, f"the {spec.method} weights in {source} do not fit this base model")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.dtype))
