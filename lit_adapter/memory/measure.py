"""Measurements that check the estimate: a training step on random weights, its peak, and autograd's saved set.

:func:`measure_step` runs the engine's step (:meth:`lit_adapter.train.trainer.Trainer.step`, the step a run executes:
forward and loss, backward, the finite checks, clipping, the optimizer) on random weights and measures the
estimator's quantity: on CUDA the allocator's peak, on CPU the peak of live bytes that the c10 CPU allocator
reports to the profiler (:class:`AllocatorPeak`), next to the process's peak resident set size. :func:`measure_in_subprocess` runs it in a fresh process
(``python -m lit_adapter.memory '<cell json>'``), so running out of memory is a result, not a crash.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.model.attention import AttentionConfig
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError, is_out_of_memory
from lit_adapter.train.losses import LOSSES, loss_fn
from lit_adapter.memory.saved import GB, OPTIMIZERS, precision_dtype
from lit_adapter.tuners.registry import MethodSpec, build_model, mark_trainable, unquantized
from lit_adapter.train.optim import build_optimizer
from lit_adapter.model.quantize import quantize_linears
from lit_adapter.tuners.base import initialize_tuner_layers
from lit_adapter.train.trainer import Trainer, method_optimizer

def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_MARKER_BYTES = 7_777_777


class AllocatorPeak:
    """Peak live bytes of the c10 CPU allocator while profiling, the CPU analogue of ``max_memory_allocated``.

    With ``profile_memory=True`` the profiler receives every allocation and free of the CPU allocator with its
    address and size. Replaying them in order gives the bytes allocated during profiling that are still alive at
    each moment (frees of blocks from before profiling are ignored, so start it before the tensors of interest
    exist). :meth:`mark` starts the window over which :attr:`peak_bytes` is taken; :attr:`at_mark_bytes` is the
    live total at its start. Allocations outside c10 (oneDNN scratch space, Python objects) are not seen.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.at_mark_bytes = 0
        self._prof = None

    def __enter__(self) -> "AllocatorPeak":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    @staticmethod
    def mark() -> None:
        torch.empty(_MARKER_BYTES, dtype=torch.uint8)  # a recognisable allocation in the event stream

    def __exit__(self, *exc) -> None:
        from torch._C._profiler import _EventType

        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        events = []
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
        events.sort(key=lambda e: e[0])
        # The allocator's own running total is not reset between profiling sessions, so replay the events.
        live, sizes, marked = 0, {}, False
        for _, ptr, size in events:
            if size > 0:
                sizes[ptr] = size
                live += size
            elif ptr in sizes:
                live -= sizes.pop(ptr)
            if abs(size) == _MARKER_BYTES and size < 0 and not marked:
                marked = True
                self.at_mark_bytes = self.peak_bytes = live
            elif marked:
                self.peak_bytes = max(self.peak_bytes, live)
        if not marked:
            raise RuntimeError("AllocatorPeak.mark() was not called inside the profiled region")


def _persistent_storages(model: nn.Module) -> set:
    """Storages of parameters, buffers, quantization state and the RoPE cache: not activations."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(model._rope_cache or ())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for name in ("CB", "SCB"):
            if isinstance(getattr(weight, name, None), torch.Tensor):
                tensors.append(getattr(weight, name))
        state = getattr(weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return {t.untyped_storage().data_ptr() for t in tensors}


def _graph_nodes(root):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions)


def measure_saved_activations(model: nn.Module, batch: torch.Tensor) -> Dict[str, Any]:
    """Bytes autograd saves in one forward + loss, by section, each storage counted once.

    The test oracle of :func:`saved_activations`: a ``saved_tensors_hooks`` pack hook sees every tensor an op
    saves; blocks, ``ln_f``/``lm_head`` and the loss are told apart by forward pre-hooks.
    """
    section = ["embedding"]
    sizes: Dict[int, Tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes.setdefault(storage.data_ptr(), (section[0], storage.nbytes()))
        return t

    def enter(name: str):
        def hook(module, args):
            section[0] = name
        return hook

    # Custom autograd functions may keep tensors as attributes of their context (bitsandbytes' ``ctx.A``), out of
    # the hooks' sight: remember in which section every module input was seen, and collect those from the graph.
    inputs: Dict[int, str] = {}

    def remember(module, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                inputs[a.untyped_storage().data_ptr()] = section[0]  # the latest use: addresses are reused

    handles = [block.register_forward_pre_hook(enter(f"layer{i}")) for i, block in enumerate(model.transformer.h)]
    handles.append(model.transformer.ln_f.register_forward_pre_hook(enter("head")))
    handles += [m.register_forward_pre_hook(remember) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(batch)
            section[0] = "loss"
            loss = loss_fn(logits, batch)[0]
    finally:
        for handle in handles:
            handle.remove()
    for node in _graph_nodes(loss.grad_fn):
        for value in list(getattr(node, "__dict__", {}).values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in inputs:
                    ptr = t.untyped_storage().data_ptr()
                    sizes.setdefault(ptr, (inputs[ptr], t.untyped_storage().nbytes()))
    persistent = _persistent_storages(model)
    out = {"layers": [0] * len(model.transformer.h), "embedding": 0, "head": 0, "loss": 0}
    for ptr, (name, nbytes) in sizes.items():
        if ptr in persistent:
            continue
        if name.startswith("layer"):
            out["layers"][int(name[5:])] += nbytes
        else:
            out[name] += nbytes
    return out


@dataclass
class Cell:
    """One measurement: a method on a model, a batch shape, precision, quantization and memory savers."""

    method: str = ""
    """The registered method to measure (required: a measurement names what it measures)."""
    pattern: str = "dense"
    attention_overrides: Dict[str, Any] = field(default_factory=dict)
    """Settings of the sparse pattern (window, group_size, ...); see ``AttentionConfig``."""
    quantize: Optional[str] = None
    precision: str = "32-true"
    seq_len: int = 256
    micro_batch_size: int = 1
    micro_batch_tokens: Optional[int] = None
    """Packing (``--data.packing``): each micro-batch is one packed row of this many tokens, examples of
    ``seq_len`` end to end (the last one shorter); it replaces ``micro_batch_size``."""
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    model_name: Optional[str] = "stories15M"
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    steps: int = 2
    """Optimizer steps under memory measurement (the first creates the optimizer state)."""
    timed_steps: int = 1
    """Further steps, timed without the profiler."""
    device: str = "cpu"
    threads: Optional[int] = None
    sdpa: str = "flash"
    loss: str = "cross_entropy"
    seed: int = 0
    memory_limit_gb: Optional[float] = None
    """CPU, in a child process only: cap the address space at its size after imports plus this, to make OOM real."""
    rope_scaling: Optional[Dict[str, Any]] = None
    """RoPE scaling of the model (``--model.rope_scaling``): its window becomes ``factor x`` the pretrained one."""
    method_settings: Dict[str, Any] = field(default_factory=dict)
    """The method's hyper-parameters (fields of its settings dataclass); empty: its defaults."""

    def model_config(self) -> Config:
        """The model as configured (and scaled): its ``block_size`` is the window a training run may use."""
        from dataclasses import replace

        config = Config.from_name(self.model_name) if self.model_name else Config(**self.config_overrides)
        if self.model_name and self.config_overrides:
            config = replace(config, **self.config_overrides)
        return config.with_rope_scaling(self.rope_scaling)

    @property
    def beyond_window(self) -> bool:
        """The context exceeds the model's window, which training refuses (memory is measured all the same)."""
        return self.seq_len > self.model_config().block_size

    def config(self) -> Config:
        """:meth:`model_config`, its RoPE table grown to cover ``seq_len`` where that exceeds the window: on random
        weights memory does not depend on the rotation angles (see :attr:`beyond_window`)."""
        from dataclasses import replace

        config = self.model_config()
        return replace(config, block_size=max(config.block_size, self.seq_len))

    def spec(self):
        attention = AttentionConfig(pattern=self.pattern, **self.attention_overrides).resolve(self.seq_len)
        return MethodSpec(self.method, settings=dict(self.method_settings) or None, attention=attention,
                          quantize=self.quantize)

    def label(self) -> str:
        return self.spec().describe()


def build_random_model(cell: Cell, device: torch.device, quant_storage: Optional[torch.dtype] = None) -> nn.Module:
    """The model ``methods.prepare_model`` would build for ``cell``, with random weights instead of a checkpoint;
    ``quant_storage`` packs a 4-bit base as sharded QLoRA does (``quantize.quantize_linears``)."""
    config, spec = cell.config(), cell.spec()
    spec.validate(config)
    dtype = precision_dtype(cell.precision)
    with torch.device("meta"):
        model = build_model(spec, config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives every module its own storage
        head = model.lm_head
        while not isinstance(head, nn.Linear):
            head = head.linear
        head.weight = model.transformer.wte.weight
    model.init_weights()
    initialize_tuner_layers(model)  # the method's own initialisation of the tensors it adds
    model = model.to(dtype=dtype)
    mark_trainable(model, spec)
    quantize_linears(model, spec.quantize, device=device, compute_dtype=dtype, skip=unquantized(spec),
                     quant_storage=quant_storage or torch.uint8)
    mark_trainable(model, spec)
    return model


def measure_step(cell: Cell) -> Dict[str, Any]:
    """Runs ``cell.steps`` + ``cell.timed_steps`` optimizer steps of the engine's loop on random weights: the model
    and optimizer set up by Fabric as a run's are, and :meth:`lit_adapter.train.trainer.Trainer.step`, the step a run
    executes.

    Returns peak memory (CUDA: the allocator's peak allocated and peak reserved bytes; on CPU the allocator peak over
    the training steps and the process's peak resident size, raw and net of the baseline after imports), step times
    and tokens/s.
    """
    from lit_adapter.train.fabric_setup import make_fabric  # imports Lightning

    if cell.threads:
        torch.set_num_threads(cell.threads)
    device = torch.device(cell.device)
    rss_baseline = peak_rss_bytes()
    torch.manual_seed(cell.seed)
    use_profiler = device.type == "cpu"
    tracker = AllocatorPeak() if use_profiler else None
    if cell.loss not in LOSSES:
        raise UserError(f"unknown loss {cell.loss!r}; choose one of {', '.join(LOSSES)}")
    step_times: List[float] = []
    result = None

    def step(trainer: Trainer) -> float:
        nonlocal result
        t0 = time.perf_counter()
        result = trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if tracker is not None:
        tracker.__enter__()
    if cell.memory_limit_gb is not None:  # after the profiler's own imports, which need address space too
        limit = _address_space_bytes() + int(cell.memory_limit_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        model = build_random_model(cell, device)
        model.gradient_checkpointing = cell.activation_checkpointing
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, cell.optimizer, model=model, spec=cell.spec())
        fabric = make_fabric(device.type, [device.index] if device.index is not None else 1,
                             precision=cell.precision)
        model, optimizer = fabric.setup(model, optimizer)
        config = cell.config()
        generator = torch.Generator().manual_seed(cell.seed)
        shape = (1, cell.micro_batch_tokens) if cell.micro_batch_tokens else (cell.micro_batch_size, cell.seq_len)
        batch = torch.randint(0, config.vocab_size, shape, generator=generator).to(device)
        # next-token targets of the batch itself; one micro-batch per step
        micro = {"input_ids": batch, "labels": batch}
        if cell.micro_batch_tokens:  # packed: examples of seq_len tokens end to end
            starts = list(range(0, cell.micro_batch_tokens, cell.seq_len))
            micro["cu_seqlens"] = torch.tensor(starts + [cell.micro_batch_tokens], dtype=torch.int32, device=device)
        trainer = Trainer(fabric, model, optimizer, itertools.repeat(micro),
                          loss=cell.loss, max_grad_norm=1.0, trainable=trainable)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # max_memory_reserved then starts from the live tensors, not the build's cache
            torch.cuda.reset_peak_memory_stats(device)
        if tracker is not None:
            tracker.mark()
        with _sdpa_backend(cell.sdpa):
            for _ in range(cell.steps):
                step_times.append(step(trainer))
    finally:
        if tracker is not None:
            tracker.__exit__(*sys.exc_info())
    with _sdpa_backend(cell.sdpa):
        for _ in range(cell.timed_steps):
            step_times.append(step(trainer))
    timed = step_times[cell.steps:] or step_times[1:] or step_times
    step_time = statistics.median(timed)
    out = {
        "status": "ok",
        "step_time_s": step_time,
        "tokens_per_s": cell.micro_batch_size * cell.seq_len / step_time,
        "loss": result.loss,
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_baseline_bytes": rss_baseline,
        "rss_peak_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }
    out["rss_net_bytes"] = out["rss_peak_bytes"] - rss_baseline
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["device_name"] = torch.cuda.get_device_name(device)
        out["peak_kind"] = "cuda_max_memory_allocated"
    else:
        out["peak_bytes"] = tracker.peak_bytes
        out["peak_kind"] = "cpu_allocator_peak"
    return out


def _sdpa_backend(sdpa: str):
    """``flash``: PyTorch's own choice (the fused kernels where they apply); ``math``: force the math path."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if sdpa == "math" else contextlib.nullcontext()


def make_optimizer(trainable: List[nn.Parameter], name: str, model: Optional[nn.Module] = None,
                   spec: Optional[MethodSpec] = None) -> torch.optim.Optimizer:
    """The engine's optimizer (its state's size does not depend on the learning rate): over the method's parameter
    groups (``trainer.method_optimizer``) given ``model`` and ``spec``, else over ``trainable`` in one group."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    settings = dict(lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
    if model is not None and spec is not None:
        return method_optimizer(model, spec, name, **settings)
    return build_optimizer(trainable, name, **settings)


def measure_in_subprocess(cell: Cell, timeout_s: float = 600.0) -> Dict[str, Any]:
    """:func:`measure_step` in a fresh Python process, so that running out of memory is a result, not a crash.

    ``status`` is ``ok``, ``oom`` (MemoryError or CUDA out of memory inside the child), ``killed (signal 9)``
    (typically the kernel's OOM killer), ``timeout`` or ``error: ...``.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lit_adapter.memory", json.dumps(asdict(cell))],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode < 0:
        return {"status": f"killed (signal {-proc.returncode})"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: exit {proc.returncode}: {tail[:300]}"}


def measure_framework_overhead() -> int:
    """Resident bytes of a fresh Python process after importing torch and lit_adapter (CPU overhead)."""
    code = ("import torch, lit_adapter.tuners.registry, lit_adapter.train.run, resource;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _address_space_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def child_main(argv: List[str]) -> None:
    cell = Cell(**json.loads(argv[0]))
    try:
        result = measure_step(cell)
    except UserError as err:
        result = {"status": f"error: {err}"}
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is reported with its message
        if not is_out_of_memory(err):
            raise
        result = {"status": "oom", "error": (str(err).splitlines() or [type(err).__name__])[0][:300]}
    print("RESULT " + json.dumps(result), flush=True)
