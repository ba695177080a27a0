"""Houlsby and Pfeiffer bottleneck adapters against AdapterHub and a written-out reference, in float32.

The oracle is AdapterHub's ``adapters`` (``DoubleSeqBnConfig`` = Houlsby, ``SeqBnConfig`` = Pfeiffer) on HF's
``LlamaForCausalLM``. Its newest release (1.3.0) pins ``transformers~=4.57.6`` and does not import with the
transformers 5 this project uses, so it is not a dev dependency and its test skips here; it runs in an overlay::

    pip install --no-deps --target /tmp/oracle transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 \\
        adapters==1.3.0
    PYTHONPATH=/tmp/oracle:. python -m pytest tests/test_bottleneck.py -k adapterhub

Everywhere, the same placement is checked against a reference written out below from the base's own layers, with
each adapter applied by hand where AdapterHub puts it, and the parameter counts against closed forms.
"""

import copy
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.model.attention import AttentionConfig
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory import (
    Cell, build_random_model, estimate_memory, measure_saved_activations, measure_step, saved_activations,
)
from lit_adapter.tuners.registry import MethodSpec, build_model, dry_run, mark_trainable
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.bottleneck import BottleneckAdapter, BottleneckConfig, HoulsbyConfig, PfeifferConfig
from lit_adapter.tuners.base import tuner_layers

from test_lora import base_model, rel_err

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig}
# the reference's activations, from torch.nn rather than the package's table
NON_LINEARITY = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "swish": nn.SiLU(),
                 "silu": nn.SiLU(), "tanh": nn.Tanh(), "leakyrelu": nn.LeakyReLU()}


def adapted(base: GPT, method: str, settings: BottleneckConfig, random: bool = True) -> GPT:
    """A copy of ``base`` with ``method``'s adapters, trainable as in a run; ``random`` makes them matter."""
    spec = MethodSpec(method, settings)
    spec.validate(base.config)
    model = copy.deepcopy(base)
    spec.definition.attach(model, settings)
    mark_trainable(model, spec)
    if random:  # scaled to the small residual stream of init_weights (N(0, 0.02)) so that no relu unit is dead
        with torch.no_grad():
            for a in tuner_layers(model, BottleneckAdapter).values():
                a.down_weight.normal_(0, 1.0)
                a.up_weight.normal_(0, 0.3)
                a.down_bias.normal_(0, 0.02)
                a.up_bias.normal_(0, 0.02)
    return model


def site_of(name: str):
    """``transformer.h.3.attn_adapter`` -> (3, "attn"); ``mlp_adapter`` -> "mlp"; the block's ``out_adapter`` ->
    (3, "block")."""
    parts = name.split(".")
    return int(parts[2]), {"attn_adapter": "attn", "mlp_adapter": "mlp", "out_adapter": "block"}[parts[3]]


def reference_logits(base: GPT, adapters, idx: torch.Tensor) -> torch.Tensor:
    """The LLaMA forward written out from ``base``'s layers, adapters ``{(layer, site): (Wd, bd, Wu, bu, act,
    scaling)}`` applied as AdapterHub does on LLaMA: a + scaling * (Wu act(Wd a + bd) + bu) on the attention and MLP
    outputs before the residual add (Houlsby), or on the block's output after the MLP's residual add (Pfeiffer)."""

    def adapter(a, key):
        if key not in adapters:
            return a
        wd, bd, wu, bu, act, scaling = adapters[key]
        return a + scaling * (act(a @ wd.T + bd) @ wu.T + bu)

    T = idx.shape[1]
    cos, sin = (t[:T] for t in base.rope_cache(idx.device))
    x = base.transformer.wte(idx)
    for i, block in enumerate(base.transformer.h):
        x = x + adapter(block.attn(block.norm_1(x), cos, sin), (i, "attn"))
        x = x + adapter(block.mlp(block.norm_2(x)), (i, "mlp"))
        x = adapter(x, (i, "block"))
    return base.output_logits(base.transformer.ln_f(x))


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_settings_are_validated():
    for bad in (dict(reduction_factor=0), dict(bottleneck_size=0), dict(bottleneck_size=2.5),
                dict(non_linearity="sigmoid"), dict(init_weights="xavier"), dict(dropout=1.0)):
        with pytest.raises(UserError):
            HoulsbyConfig(**bad)
    config = Config.from_name("tiny")  # 2 layers
    for method in SETTINGS:
        with pytest.raises(UserError, match=f"{method} leave_out=\\[2\\] names layers the model lacks"):
            MethodSpec(method, SETTINGS[method](leave_out=[2])).validate(config)
        with pytest.raises(UserError, match="covers all 2 layers: nothing would train"):
            MethodSpec(method, SETTINGS[method](leave_out=[1, 0, 1])).validate(config)
    assert HoulsbyConfig().non_linearity == "swish" and PfeifferConfig().non_linearity == "relu"  # AdapterHub's
    assert HoulsbyConfig(reduction_factor=3).width(32) == 10 and HoulsbyConfig(reduction_factor=64).width(32) == 1
    assert HoulsbyConfig(reduction_factor=0.5).width(32) == 64 and HoulsbyConfig(bottleneck_size=5).width(32) == 5


@pytest.mark.parametrize("method", SETTINGS)
def test_initialisation(method):
    base = base_model("tiny-gqa")
    idx = torch.randint(0, base.config.vocab_size, (2, 12))
    # mam_adapter: zero up projection, so the model is the base bit for bit
    exact = adapted(base, method, SETTINGS[method](init_weights="mam_adapter"), random=False)
    assert torch.equal(exact(idx), base(idx))
    for a in tuner_layers(exact, BottleneckAdapter).values():
        bound = 1 / a.size ** 0.5  # kaiming_uniform_(a=sqrt(5))
        assert a.up_weight.abs().max() == 0 and 0.75 * bound < a.down_weight.abs().max() <= bound
    # bert (AdapterHub's default) and houlsby (the paper's) are near the identity
    for init, std in (("bert", 0.02), ("houlsby", 0.0088)):  # a N(0, 0.01) cut at 2 std has std 0.0088
        model = adapted(base, method, SETTINGS[method](init_weights=init, reduction_factor=1), random=False)
        weights = torch.cat([t.flatten() for a in tuner_layers(model, BottleneckAdapter).values()
                             for t in (a.down_weight, a.up_weight)])
        assert weights.std().item() == pytest.approx(std, rel=0.05)
        assert init == "bert" or weights.abs().max() <= 0.02
        assert all(a.down_bias.abs().max() == 0 and a.up_bias.abs().max() == 0
                   for a in tuner_layers(model, BottleneckAdapter).values())
        assert 0 < rel_err(model(idx), base(idx)) < 0.05


@pytest.mark.parametrize("method, settings", [
    ("houlsby", {}),
    ("pfeiffer", {}),
    ("houlsby", dict(non_linearity="gelu", scaling=2.0, reduction_factor=4, leave_out=[1])),
    ("pfeiffer", dict(non_linearity="tanh", bottleneck_size=5, leave_out=[0])),
])
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_logits_and_gradients_equal_the_written_out_reference(method, settings, name):
    base = base_model(name, n_layer=3)
    cfg = SETTINGS[method](**settings)
    model = adapted(base, method, cfg)
    adapters = tuner_layers(model, BottleneckAdapter)
    sites = {"houlsby": ("attn", "mlp"), "pfeiffer": ("block",)}[method]
    assert sorted(site_of(n) for n in adapters) == sorted(
        (i, s) for i in range(3) if i not in cfg.leave_out for s in sites)
    leaves = {site_of(n): [p.detach().clone().requires_grad_() for p in (a.down_weight, a.down_bias, a.up_weight,
                                                                      a.up_bias)] for n, a in adapters.items()}
    act = NON_LINEARITY[cfg.non_linearity]
    idx = torch.randint(0, base.config.vocab_size, (2, 13))
    targets = torch.randint(0, base.config.vocab_size, (2, 13))
    ours = model(idx)
    expected = reference_logits(base, {k: (*v, act, cfg.scaling) for k, v in leaves.items()}, idx)
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(ours, base(idx)) > 0.1  # the adapters matter
    loss_of(ours, targets).backward()
    loss_of(expected, targets).backward()
    for n, a in adapters.items():
        for p, leaf in zip((a.down_weight, a.down_bias, a.up_weight, a.up_bias), leaves[site_of(n)]):
            assert leaf.grad.abs().max() > 0 and rel_err(p.grad, leaf.grad) < 1e-5, n
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _adapterhub():
    try:
        import adapters
    except ImportError as err:
        pytest.skip(f"adapters (AdapterHub) does not import here ({err}); its newest release pins "
                    "transformers~=4.57.6: see this module's docstring for the overlay that runs this test")
    return adapters


@pytest.mark.parametrize("method, settings", [
    ("houlsby", {}),
    ("pfeiffer", {}),
    ("houlsby", dict(non_linearity="gelu", scaling=2.0, reduction_factor=4, leave_out=[1])),
    ("pfeiffer", dict(non_linearity="tanh", reduction_factor=3, leave_out=[0])),
])
def test_logits_gradients_and_counts_equal_adapterhub(method, settings):
    adapters = _adapterhub()
    import transformers

    from lit_adapter.convert import lit_to_hf_state_dict

    base = base_model("tiny-gqa", n_layer=3)
    cfg = SETTINGS[method](**settings)
    model = adapted(base, method, cfg)
    c = base.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings, attn_implementation="eager",
    ))
    hf.load_state_dict(lit_to_hf_state_dict(base.state_dict()))
    adapters.init(hf)
    oracle_config = {"houlsby": adapters.DoubleSeqBnConfig, "pfeiffer": adapters.SeqBnConfig}[method]
    hf.add_adapter("bn", config=oracle_config(reduction_factor=cfg.reduction_factor, non_linearity=cfg.non_linearity,
                                              scaling=cfg.scaling, leave_out=cfg.leave_out))
    hf.train_adapter("bn")  # freezes the rest and activates the adapter
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = []
    for name, ours in tuner_layers(model, BottleneckAdapter).items():
        layer, site = site_of(name)
        holder = hf.model.layers[layer]
        theirs = (holder.attention_adapters if site == "attn" else holder.output_adapters).adapters["bn"]
        pairs += [(ours.down_weight, theirs.adapter_down[0].weight), (ours.down_bias, theirs.adapter_down[0].bias),
                  (ours.up_weight, theirs.adapter_up.weight), (ours.up_bias, theirs.adapter_up.bias)]
    with torch.no_grad():
        for p, q in pairs:
            q.copy_(p)
    idx = torch.randint(0, c.vocab_size, (2, 13))
    targets = torch.randint(0, c.vocab_size, (2, 13))
    ours, theirs = model(idx), hf(idx).logits
    assert rel_err(ours, theirs) < 1e-5 and rel_err(ours, base(idx)) > 0.1
    loss_of(ours, targets).backward()
    loss_of(theirs, targets).backward()
    for p, q in pairs:
        assert q.grad.abs().max() > 0 and rel_err(p.grad, q.grad) < 1e-5


def adapter_params(n_embd: int, r: int) -> int:
    """One adapter: down (r x n_embd) and its bias, up (n_embd x r) and its bias."""
    return 2 * n_embd * r + r + n_embd


def test_trainable_counts_and_checkpoint_names():
    base = base_model("tiny", n_layer=3)  # n_embd 32
    for method, per_layer in (("houlsby", 2), ("pfeiffer", 1)):
        spec = MethodSpec(method, SETTINGS[method](reduction_factor=8, leave_out=[1]))
        model = adapted(base, method, spec.settings, random=False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer * adapter_params(32, 4)
        # the base keeps its names: a base checkpoint loads as it is, and only the adapters are new
        keys = set(model.state_dict())
        assert set(base.state_dict()) <= keys
        assert all(spec.definition.is_added(k) and spec.definition.trainable(k) for k in keys - set(base.state_dict()))
        assert not any(spec.definition.trainable(k) for k in base.state_dict())
        fresh = build_model(spec, base.config)
        assert fresh.load_state_dict(base.state_dict(), strict=False).unexpected_keys == []


def test_seed_004_houlsby_percentage_and_our_7b_counts(capsys):
    """Seed 004, 3.1.d: an L=10 sigmoid MLP with D_l = 2^(L-l) (D_0 = 2^L) and a rank-4 Houlsby adapter after each
    layer, a + (V_up GELU(V_down a + v_down) + v_up). The base has sum_l (D_l D_(l-1) + D_l) parameters; the adapters
    are the trainable share of the adapted model's total."""
    L, r = 10, 4
    D = [2 ** (L - l) for l in range(L + 1)]
    base = sum(D[l] * D[l - 1] + D[l] for l in range(1, L + 1))
    per_layer = [adapter_params(D[l], r) for l in range(1, L + 1)]
    assert base == 700_073 and sum(per_layer) == 9_247
    assert f"{100 * sum(per_layer) / (base + sum(per_layer)):.2f}" == "1.30"
    # the formula is our adapter's size, including where the "bottleneck" (4) is wider than D_l (2, 1)
    assert [sum(p.numel() for p in BottleneckAdapter(D[l], r, HoulsbyConfig()).parameters())
            for l in range(1, L + 1)] == per_layer
    # LLaMA 7B: n_embd 4096, reduction 16 -> r = 256; two adapters per layer (Houlsby) or one (Pfeiffer), 32 layers
    full = 6_738_415_616
    for method, per, percent in (("houlsby", 2, "1.96"), ("pfeiffer", 1, "0.99")):
        trainable, total = dry_run(MethodSpec(method), Config.from_name("7B"))
        assert trainable == 32 * per * adapter_params(4096, 256) and total == full + trainable
        assert f"{100 * trainable / total:.2f}" == percent
    assert (trainable, capsys.readouterr().out.count("trainable parameters:")) == (67_248_128, 2)


def test_7b_dry_run_from_the_command_line(capsys):
    proc = subprocess.run([sys.executable, "finetune/houlsby.py", "--model_name", "7B", "--dry_run", "true"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert f"trainable parameters: {64 * adapter_params(4096, 256)}\n" in proc.stdout  # 134,496,256
    assert re.search(r"PEAK\s+[0-9.]+ GB", proc.stdout), proc.stdout
    from jsonargparse import CLI, set_parsing_settings

    from test_scripts import load_setup

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    for method in SETTINGS:
        with pytest.raises(SystemExit):
            CLI(load_setup(method), args=["--help"], as_positional=False)
        text = " ".join(capsys.readouterr().out.split())
        assert f"--{method}.leave_out" in text and "Layers (from 0) that get no adapter" in text
        assert f"({method.capitalize()} et al. 20" in text


@pytest.mark.parametrize("method", SETTINGS)
def test_checkpointing_kv_cache_and_sparse_attention_compose(method):
    base = base_model("tiny-gqa", n_layer=3)
    model = adapted(base, method, SETTINGS[method]())
    idx = torch.randint(0, base.config.vocab_size, (2, 12))
    full = model(idx)
    full.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()(idx).sum().backward()
    assert all(torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7) for g, p in
               zip(grads, (p for p in model.parameters() if p.requires_grad)))
    with torch.no_grad():  # incremental decoding: the adapters act token by token
        model.eval().set_kv_cache(batch_size=2)
        steps = [model(idx[:, :8], input_pos=torch.arange(8))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(8, 12)]
        model.clear_kv_cache()
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    spec = MethodSpec(method, attention=AttentionConfig(pattern="local", window=4))
    local = build_model(spec, base.config)
    local.load_state_dict(model.state_dict())
    assert rel_err(local(idx[:, :4]), model(idx[:, :4])) < 1e-5  # a window of 4 covers 4 tokens: dense
    assert rel_err(local(idx), full) > 1e-3


SMALL = dict(name="small", block_size=256, vocab_size=1000, n_layer=3, n_head=4, n_embd=64, intermediate_size=192)


@dataclass
class SettingsCell(Cell):
    """A measurement cell with the method's settings (``Cell`` measures the defaults)."""

    settings: dict = field(default_factory=dict)

    def spec(self):
        return MethodSpec(self.method, settings=self.settings, quantize=self.quantize,
                          attention=AttentionConfig(pattern=self.pattern, **self.attention_overrides).resolve(
                              self.seq_len))


def _cell(**kwargs) -> SettingsCell:
    return SettingsCell(model_name=None, config_overrides={**SMALL, **kwargs.pop("config", {})}, **kwargs)


@pytest.mark.parametrize("method, settings, precision, quantize, pattern", [
    ("houlsby", {}, "32-true", None, "dense"),
    ("pfeiffer", {}, "32-true", None, "dense"),
    ("houlsby", dict(non_linearity="relu", dropout=0.1, leave_out=[0]), "bf16-true", None, "local"),
    ("pfeiffer", dict(non_linearity="gelu", bottleneck_size=7, scaling=2.0, dropout=0.1), "32-true", "bnb.int8",
     "dense"),
    ("houlsby", dict(non_linearity="tanh"), "32-true", "bnb.nf4", "dense"),
    ("pfeiffer", dict(non_linearity="leakyrelu", leave_out=[1]), "bf16-true", None, "shifted"),
])
def test_saved_activations_match_autograd(method, settings, precision, quantize, pattern):
    cell = _cell(method=method, settings=settings, precision=precision, quantize=quantize, pattern=pattern,
                 attention_overrides={"window": 16} if pattern == "local" else {}, seq_len=40, micro_batch_size=2,
                 config={"n_query_groups": 2})
    model = build_random_model(cell, torch.device("cpu")).train()
    measured = measure_saved_activations(model, torch.randint(0, 1000, (2, 40)))
    predicted = saved_activations(cell.config(), cell.spec(), 2, 40, precision)
    assert measured["layers"] == predicted["layers"] and measured["head"] == predicted["head"]


@pytest.mark.parametrize("cell", [
    _cell(method="houlsby", seq_len=128, micro_batch_size=2, config={"vocab_size": 32000}),
    _cell(method="pfeiffer", seq_len=512, micro_batch_size=1, config={"vocab_size": 512, "n_embd": 128,
                                                                      "intermediate_size": 352}),
    _cell(method="houlsby", settings=dict(dropout=0.1), seq_len=256, micro_batch_size=2, precision="bf16-true",
          activation_checkpointing=True, config={"vocab_size": 4096}),
    _cell(method="pfeiffer", settings=dict(dropout=0.1, non_linearity="gelu"), seq_len=256, micro_batch_size=2,
          precision="bf16-true", config={"vocab_size": 4096}),
], ids=["houlsby-32k-vocab", "pfeiffer-long", "houlsby-bf16-dropout-checkpointed", "pfeiffer-bf16-gelu-dropout"])
def test_estimate_within_15_percent_of_measured_cpu_peak(cell):
    cell.steps, cell.timed_steps = 2, 0
    measured = measure_step(cell)
    estimate = estimate_memory(cell.config(), cell.spec(), cell.micro_batch_size, cell.seq_len, cell.precision,
                               activation_checkpointing=cell.activation_checkpointing)
    error = estimate["peak_bytes"] / measured["peak_bytes"] - 1
    print(f"measured {measured['peak_bytes']:,} estimated {estimate['peak_bytes']:,} ({100 * error:+.2f}%)")
    assert measured["peak_kind"] == "cpu_allocator_peak" and abs(error) < 0.15
    assert measured["trainable_params"] == estimate["trainable_params"]
