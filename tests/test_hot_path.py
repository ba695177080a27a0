"""The hot path stays fast on a GPU, checked on CPU: grouped-query attention reads grouped keys and values (no
``repeat_interleave`` copy in training or of the KV cache in decoding), one optimizer step synchronises the host
with the device at most once outside log and eval intervals, and checkpoints carry every CUDA device's RNG state."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lit_adapter.memory import Cell, build_random_model
from lit_adapter.train.fabric_setup import make_fabric
from lit_adapter.train.trainer import Trainer, method_optimizer

# ------------------------------------------------------------------------------------------- host synchronisation

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device: scalar reads (``.item()``, ``float(t)``, ``bool(t)``,
    ``int(t)``, Python control flow on a tensor) and copies from a device to the host (``.cpu()``, ``.tolist()``
    of a device tensor). ``.tolist()`` of a host tensor dispatches nothing, so it is counted by patching it.

    The optimizer's step counters are excluded: torch's AdamW keeps them on the host unless ``capturable`` (its
    ``.item()`` of them costs no synchronisation on a GPU); on CPU every tensor is a host tensor, so they are
    recognised by identity."""

    def __init__(self, optimizer) -> None:
        super().__init__()
        self.optimizer, self.reads = optimizer, []

    def _is_step_counter(self, t) -> bool:
        return any(t is state.get("step") for state in self.optimizer.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS and not self._is_step_counter(args[0]):
            self.reads.append(func.__name__)
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(target or src.device).type == "cpu":
                self.reads.append("device_to_host")
        return func(*args, **kwargs)


def _cell(method="lora", **kw):
    settings = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "adapter": {"prompt_length": 4, "start_layer": 1},
                "prefix_tuning": {"num_virtual_tokens": 4}}[method]
    return Cell(**{**dict(method=method, model_name="stories260K", seq_len=32, micro_batch_size=2,
                          precision="32-true", device="cpu", method_settings=settings), **kw})


def _batches(cell, n=4):
    g = torch.Generator().manual_seed(0)
    vocab = cell.config().vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (cell.micro_batch_size, cell.seq_len), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # a masked prompt, as instruction data has
        out.append({"input_ids": ids, "labels": labels})
    return itertools.cycle(out)


def _count_step_reads(trainer, monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def tolist(self):
        calls.append("tolist")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with HostReads(trainer.optimizer) as mode:
        trainer.step()
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    return mode.reads + calls


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix_tuning"])
@pytest.mark.parametrize("loss", ["cross_entropy", "chunked", "chunked_head"])
def test_a_step_synchronises_host_and_device_once(method, loss, monkeypatch):
    """A step outside log and eval intervals (gradient accumulation over 2 micro-batches, clipping, AdamW, the
    finite checks) reads the device once: the loss and the gradient norm together (``trainer.read_on_host``)."""
    torch.manual_seed(0)
    cell = _cell(method)  # stories260K: 8 query heads in 4 groups
    model = build_random_model(cell, torch.device("cpu")).train()
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
    fabric = make_fabric("cpu", precision=cell.precision)
    model, optimizer = fabric.setup(model, optimizer)
    trainer = Trainer(fabric, model, optimizer, _batches(cell), accum=2, loss=loss, max_grad_norm=1.0)
    trainer.step()  # the first step creates the optimizer's state
    reads = _count_step_reads(trainer, monkeypatch)
    assert len(reads) <= 1, reads
    assert reads == ["tolist"]  # ... and that one read is the step's combined one
    assert trainer.state.step == 2


def _collated_batches(cell, packing: bool, n=4):
    """Micro-batches as the run's loader makes them (the objective's collation, on the host): padded rows or
    packed rows, each with its host-made target rows and, packed, its examples' lengths."""
    from lit_adapter.train.objectives import Objective

    g = torch.Generator().manual_seed(0)
    vocab, objective, out = cell.config().vocab_size, Objective(), []
    for _ in range(n):
        examples = []
        for length in (9, 17, 6):
            ids = torch.randint(0, vocab, (length,), generator=g)
            labels = ids.clone()
            labels[:4] = -100
            examples.append({"input_ids": ids, "labels": labels})
        out.append(objective.collate_packed(examples) if packing else objective.collate(examples, pad_id=0))
    return itertools.cycle(out)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_collated_step_synchronises_once_packed_or_not(method, packing, monkeypatch):
    """With the loader's own batches: the packed forward takes its layout from the batch's host ``lengths`` (not
    a read of ``cu_seqlens`` back from the device) and the head's target rows come with the batch, so a packed or
    padded step still reads the device once."""
    torch.manual_seed(0)
    cell = _cell(method)
    model = build_random_model(cell, torch.device("cpu")).train()
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
    fabric = make_fabric("cpu", precision=cell.precision)
    model, optimizer = fabric.setup(model, optimizer)
    trainer = Trainer(fabric, model, optimizer, _collated_batches(cell, packing), accum=2, max_grad_norm=1.0)
    trainer.step()
    assert _count_step_reads(trainer, monkeypatch) == ["tolist"]


def test_the_counter_sees_the_reads_it_must_forbid(monkeypatch):
    """The dispatch mode is not blind: ``.item()``, ``float()``, ``bool()`` in control flow and ``torch.isfinite(t)
    .all()`` as a condition each count as a read."""
    t = torch.ones(3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with HostReads(optimizer) as mode:
        t.sum().item()
        float(t.sum())
        if bool(t.max() > 0):
            pass
        if torch.isfinite(t).all():
            pass
    assert len(mode.reads) == 4


# ----------------------------------------------------------------------------------------- grouped-query attention

def _forbid_repeat_interleave(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave on the hot path")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix_tuning"])
def test_grouped_keys_are_never_repeated_in_training_or_decoding(method, monkeypatch):
    """Dense training (forward and backward) and KV-cache decoding of a GQA model (8 heads, 4 groups) run without a
    repeated copy of k, v or the cache, the adaption prompts' and prefixes' grouped keys included."""
    torch.manual_seed(0)
    cell = _cell(method)  # stories260K: 8 query heads in 4 groups
    model = build_random_model(cell, torch.device("cpu"))
    assert model.config.n_head // model.config.n_query_groups == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    _forbid_repeat_interleave(monkeypatch)
    model.train()
    logits = model(ids)
    logits.float().pow(2).mean().backward()
    model.eval()
    with torch.no_grad():
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        prefill = model(ids[:, :8], input_pos=torch.arange(8))
        step = model(ids[:, 8:9], input_pos=torch.tensor([8]))
        full = model(ids[:, :9])
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, full[:, 8:9], rtol=1e-5, atol=1e-5)
    for block in model.transformer.h:  # the cache holds ng heads, as it always did
        assert block.attn.kv_cache.k.shape[1] == model.config.n_query_groups


GQA_CASES = [
    pytest.param(dict(is_causal=True), id="causal"),
    pytest.param(dict(mask="square"), id="bool-mask"),
    pytest.param(dict(mask="batched"), id="batched-bool-mask"),
    pytest.param(dict(), id="no-mask"),
]


@pytest.mark.parametrize("backend", ["flash", "math"])
@pytest.mark.parametrize("case", GQA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sdpa_enable_gqa_equals_repeated_keys_on_every_cpu_backend(backend, case, dtype):
    """``enable_gqa`` (what ``gpt.attend`` uses) gives the output and the gradients of SDPA over keys and values
    repeated per query head, on the CPU backends we use, forward and backward; the gradients of the grouped k and
    v are the sums over their query heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    B, nh, ng, T, S, hs = 2, 6, 2, 5, 7, 8
    S = T if case.get("is_causal") else S
    q = torch.randn(B, nh, T, hs, dtype=dtype, requires_grad=True)
    k = torch.randn(B, ng, S, hs, dtype=dtype, requires_grad=True)
    v = torch.randn(B, ng, S, hs, dtype=dtype, requires_grad=True)
    kwargs = {}
    if case.get("is_causal"):
        kwargs["is_causal"] = True
    elif case.get("mask") == "square":
        kwargs["attn_mask"] = torch.rand(T, S) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif case.get("mask") == "batched":
        kwargs["attn_mask"] = torch.rand(B, 1, T, S) > 0.3
        kwargs["attn_mask"][..., 0] = True
    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend]
    if backend == "flash" and (kwargs.get("attn_mask") is not None or dtype == torch.float64):
        kernel = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # CPU flash takes masks; let SDPA choose
    with sdpa_kernel(kernel):
        grouped = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        g = torch.autograd.grad(grouped.float().sum(), (q, k, v))
        r = nh // ng
        repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), **kwargs)
        gr = torch.autograd.grad(repeated.float().sum(), (q, k, v))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, repeated, **tol)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------------------------------------- CUDA RNG state

class FakeCuda:
    """Two CUDA devices as far as the RNG calls go, on a CPU-only machine: their states are distinct byte tensors,
    and what is restored is recorded per device."""

    def __init__(self, monkeypatch, current=0, count=2):
        self.states = [torch.arange(16, dtype=torch.uint8) + 16 * i for i in range(count)]
        self.restored = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.restored.__setitem__(device, state))


def _trained(tmp_path, steps=1):
    from lit_adapter.train import trainer as trainer_module
    from lit_adapter.train.trainer import save_resumable

    cell = _cell()
    model = build_random_model(cell, torch.device("cpu")).train()
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    fabric = make_fabric("cpu", precision=cell.precision)
    model, optimizer = fabric.setup(model, optimizer)
    trainer = Trainer(fabric, model, optimizer, _batches(cell), accum=1)
    for _ in range(steps):
        trainer.step()
    path = tmp_path / "last.ckpt"
    state = trainer_module.checkpoint_state(trainer.model, trainer.optimizer, None, trainer.state)
    save_resumable(trainer.fabric, state, path, cell.spec(), trainer.model)
    return cell, trainer, path


def _resume(cell, trainer, path):
    from lit_adapter.train import trainer as trainer_module
    from lit_adapter.train.trainer import TrainState, load_resumable

    fresh = trainer_module.checkpoint_state(trainer.model, trainer.optimizer, None, TrainState())
    return TrainState.from_dict(load_resumable(trainer.fabric, fresh, path, trainer.model, cell.spec()))


def test_checkpoints_carry_every_cuda_devices_rng_state(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch)
    cell, trainer, path = _trained(tmp_path)
    saved = torch.load(path, weights_only=True)
    assert saved["cuda_rng"]["device"] == 0
    assert [s.tolist() for s in saved["cuda_rng"]["states"]] == [s.tolist() for s in cuda.states]
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2  # the generators move on after the save
    state = _resume(cell, trainer, path)
    # one process: every device gets its own state back
    assert sorted(cuda.restored) == [0, 1]
    assert cuda.restored[1].tolist() == (torch.arange(16) + 16).tolist()
    assert state.cuda_rng is not None and state.step == 1


def test_under_ddp_each_rank_gets_the_state_of_rank_0s_own_device(tmp_path, monkeypatch):
    FakeCuda(monkeypatch, current=0)
    cell, trainer, path = _trained(tmp_path)
    cuda = FakeCuda(monkeypatch, current=1)  # rank 1, computing on device 1
    monkeypatch.setattr(type(trainer.fabric), "world_size", property(lambda self: 2))
    _resume(cell, trainer, path)
    assert list(cuda.restored) == [1]
    assert cuda.restored[1].tolist() == list(range(16))  # device 0's state at save time: rank 0's stream


def test_without_cuda_the_field_is_absent_and_ignored(tmp_path, monkeypatch):
    cell, trainer, path = _trained(tmp_path)  # this machine: no CUDA
    assert "cuda_rng" not in torch.load(path, weights_only=True)
    assert _resume(cell, trainer, path).cuda_rng is None
    # a checkpoint written on a GPU resumes on a CPU: the CUDA states are kept in the state, not applied
    FakeCuda(monkeypatch)
    (tmp_path / "gpu").mkdir()
    cell, trainer, gpu_path = _trained(tmp_path / "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resume(cell, trainer, gpu_path).step == 1


def test_a_checkpoint_without_cuda_rng_state_still_loads_on_a_gpu(tmp_path, monkeypatch):
    """Older checkpoints (and CPU ones) have no ``cuda_rng``: a CUDA machine resumes them, restoring nothing new."""
    cell, trainer, path = _trained(tmp_path)
    cuda = FakeCuda(monkeypatch)
    state = _resume(cell, trainer, path)
    assert state.step == 1
    # the state the fresh dict held (the machine's own) was put back: a no-op for the generators
    assert all(cuda.restored[i].tolist() == cuda.states[i].tolist() for i in cuda.restored)
