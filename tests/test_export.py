"""scripts/convert_to_hf.py: lit checkpoints and merged fine-tunes as HF folders, checked against transformers.

The oracle is transformers itself: the written folder is loaded with AutoModelForCausalLM / AutoTokenizer and its
logits and token ids are compared with ours; the way back uses our own HF converter (lit -> HF -> lit must give the
same tensors bit for bit).
"""

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import load_state_dict
from lit_adapter.model.config import Config
from lit_adapter.convert import convert_hf_checkpoint, write_checkpoint_dir
from lit_adapter.errors import UserError
from lit_adapter.export import convert_to_hf
from lit_adapter.tuners.registry import MethodSpec, prepare_model, save_adapter
from lit_adapter.model.gpt import GPT
from lit_adapter.data.tokenizer import Tokenizer, llama2c_vocab_to_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Once upon a time, there was a little girl.", "  two leading spaces", "multiple   spaces\nand a newline",
         " ", "", "émoji 🦙 and ünïcödé", "12345 + 678 = ?", "trailing  ", "\n\n  indented\ttab"]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tok512(shared_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(llama2c_vocab_to_sentencepiece(shared_data / "checkpoints" / "stories260K" / "tok512.bin"))
    return path


def make_base(path: Path, tokenizer: Path, name: str = "tiny", dtype=None, **overrides) -> Path:
    """A random checkpoint folder with non-trivial norm weights (so a misplaced norm shows)."""
    config = Config.from_name(name, **overrides)
    model = GPT(config)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_f" in n:
                p.uniform_(0.5, 1.5)
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    write_checkpoint_dir(path, config, state, tokenizer, dtype=dtype)
    return path


def make_run(out: Path, base_dir: Path, method: str, settings=None, recorded_quantize=None, attention=None,
             edit=None) -> tuple:
    """A finished run's final/ with every trained tensor moved away from its initial value; returns the folder and
    our model as trained (unmerged, eval mode), the reference for the logits."""
    spec = MethodSpec(method, settings, **({"attention": attention} if attention else {}))
    config = Config.from_checkpoint_dir(base_dir)
    model = prepare_model(spec, config, base_dir, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
        if edit is not None:
            edit(model)
    spec.quantize = recorded_quantize  # as adapter_config.json records it; the weights stay full precision here
    final = save_adapter(model, spec, config, base_dir, out / "final")
    return final, model.eval()


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------------
# The base


@pytest.mark.parametrize("name, tied, shard", [("tiny", False, None), ("tiny-gqa", True, "20KB")],
                         ids=["mha-untied", "gqa-tied-sharded"])
def test_base_loads_in_transformers_with_our_logits_and_converts_back_bit_for_bit(tmp_path, tok512, name, tied,
                                                                                  shard):
    base = make_base(tmp_path / "base", tok512, name, tie_embeddings=tied, rope_base=500000.0)
    out = tmp_path / "hf"
    files = convert_to_hf(out, checkpoint_dir=base, **({"max_shard_size": shard} if shard else {}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tied
    assert (cfg["attention_bias"], cfg["mlp_bias"], cfg["rope_theta"]) == (False, False, 500000.0)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards == sorted(f for f in files if f.startswith("model-"))
        assert "lm_head.weight" not in index["weight_map"]  # a tied head is stored once, as the embedding
    else:
        assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()

    from lit_adapter.checkpoint import load_checkpoint_dir

    _, ours, _ = load_checkpoint_dir(base)
    idx = ids()
    with torch.no_grad():
        expected = ours(idx)
    assert rel_error(hf_logits(out, idx), expected) < 1e-5

    back = tmp_path / "back"
    config = convert_hf_checkpoint(out, back)
    original = Config.from_checkpoint_dir(base)
    assert {**vars(config), "name": ""} == {**vars(original), "name": ""}
    a, b = load_state_dict(base / "lit_model.safetensors"), load_state_dict(back / "lit_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (back / "tokenizer.model").read_bytes() == tok512.read_bytes()


def test_the_export_keeps_the_stored_dtype_unless_told(tmp_path, tok512):
    base = make_base(tmp_path / "base", tok512, dtype=torch.bfloat16)
    convert_to_hf(tmp_path / "hf", checkpoint_dir=base)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "back")
    a, b = load_state_dict(base / "lit_model.safetensors"), load_state_dict(tmp_path / "back" / "lit_model.safetensors")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    convert_to_hf(tmp_path / "hf32", checkpoint_dir=base, dtype="float32")
    assert {t.dtype for t in load_state_dict(tmp_path / "hf32" / "model.safetensors").values()} == {torch.float32}


def test_stories260k_logits_and_token_ids_match_transformers(tmp_path, stories260k):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    convert_to_hf(out, checkpoint_dir=stories260k)
    from lit_adapter.checkpoint import load_checkpoint_dir

    _, ours, tokenizer = load_checkpoint_dir(stories260k)
    idx = torch.stack([tokenizer.encode(TEXTS[0], max_length=12), ids()[0, :12]])
    with torch.no_grad():
        expected = ours(idx)
    assert rel_error(hf_logits(out, idx), expected) < 1e-5
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tokenizer(text).input_ids == tokenizer.encode(text).tolist(), text
        assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_llama_tokenizer_files_give_our_token_ids(tmp_path, shared_data):
    """The 32,000-piece LLaMA tokenizer: transformers' own conversion of tokenizer.model differs from SentencePiece
    on leading runs of spaces; the tokenizer.json written beside it does not."""
    from transformers import AutoTokenizer

    from lit_adapter.convert.hf_tokenizer import write_tokenizer_files

    ours = Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")
    write_tokenizer_files(tmp_path, ours.processor.serialized_model_proto(), 4096)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token, hf.pad_token) == (1, 2, "<unk>", None)
    text = (shared_data / "wikitext-2-raw" / "wiki.test.joined.txt").read_text()[:20000]
    for sample in TEXTS + text.split("\n\n")[:60]:
        assert hf(sample).input_ids == ours.encode(sample).tolist(), repr(sample[:60])
        assert hf.decode(hf(sample).input_ids, skip_special_tokens=True) == ours.decode(ours.encode(sample))


# ---------------------------------------------------------------------------------------------------------------------
# Merged fine-tunes


def _zero_gates(model):
    for name, param in model.named_parameters():
        if "gating_factor" in name:
            param.zero_()


def _zero_head_bias(model):
    model.lm_head.adapter_bias.zero_()


@pytest.mark.parametrize("method, settings, tied, edit, flags", [
    ("lora", dict(r=4, alpha=8, key=True, projection=True, mlp=True, head=True), True, None, (False, False)),
    ("ia3", None, False, None, (False, False)),
    ("ia3", dict(targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), feedforward=("o_proj", "down_proj")),
     False, None, (False, False)),
    ("bitfit", None, True, None, (True, True)),
    ("adapter_v2", dict(prompt_length=3, start_layer=1), True,
     lambda m: (_zero_gates(m), _zero_head_bias(m)), (True, True)),
    ("adapter", dict(prompt_length=3, start_layer=0), False, _zero_gates, (False, False)),
    ("full", None, True, None, (False, False)),
], ids=["lora-all-targets-tied-head", "ia3", "ia3-more-targets", "bitfit", "adapter_v2-zero-gates",
        "adapter-zero-gates", "full"])
def test_merged_run_loads_in_transformers_with_the_logits_of_the_unmerged_run(tmp_path, tok512, method, settings,
                                                                              tied, edit, flags, capsys):
    base = make_base(tmp_path / "base", tok512, "tiny-gqa", tie_embeddings=tied)
    final, model = make_run(tmp_path / "run", base, method, settings, edit=edit)
    out = tmp_path / "hf"
    convert_to_hf(out, adapter_dir=final, merge_adapter=True)  # the base recorded in adapter_config.json
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["attention_bias"], cfg["mlp_bias"]) == flags
    untied = method in ("lora", "adapter_v2")  # the head changed, the embedding it was tied to did not
    assert cfg["tie_word_embeddings"] is (tied and not untied)
    notes = capsys.readouterr().err
    assert ("exported untied" in notes) is (tied and untied)
    assert ("adaption prompts" in notes) is method.startswith("adapter")
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(hf_logits(out, idx), expected) < 1e-5


def _wrappers():
    from lit_adapter.tuners.adapter_v2 import AdapterV2Linear
    from lit_adapter.tuners.bitfit import BitFitLinear
    from lit_adapter.tuners.ia3 import IA3Linear
    from lit_adapter.tuners.lora import LoRALinear

    return {"lora": lambda lin: LoRALinear(lin, r=2, alpha=3.0), "ia3-out": lambda lin: IA3Linear(lin),
            "ia3-in": lambda lin: IA3Linear(lin, feedforward=True), "bitfit": BitFitLinear, "v2": AdapterV2Linear}


@pytest.mark.parametrize("kind", list(_wrappers()))
@pytest.mark.parametrize("bias", [False, True])
def test_every_wrapper_folds_into_the_plain_linear_it_computes(kind, bias):
    """The fold protocol (LinearWrapper.fold_weights) against the wrapper's own forward, on a base with and
    without a bias; the in-place fold for inference (LoRA's merge, IA³'s fold) is the same arithmetic."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=bias)
    wrapper = _wrappers()[kind](linear).eval()
    with torch.no_grad():
        for param in wrapper.parameters():
            if param is not linear.weight and param is not linear.bias:
                param.copy_(torch.randn_like(param))
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = wrapper(x)
        weight, new_bias = wrapper.fold_weights(linear.weight.float(), None if linear.bias is None else linear.bias)
        assert wrapper.fold_refusal() is None
        assert torch.allclose(torch.nn.functional.linear(x, weight, new_bias), expected, atol=1e-6)
        no_weight, bias_alone = wrapper.fold_weights(None, linear.bias)  # the head's bias, checked before loading
        assert no_weight is None and (bias_alone is new_bias or torch.equal(bias_alone, new_bias))
        in_place = getattr(wrapper, "merge", None) or getattr(wrapper, "fold", None)
        if in_place is not None:
            in_place()
            assert torch.equal(linear.weight, weight) and wrapper(x).allclose(expected, atol=1e-6)


def test_lora_merge_is_w_plus_scaled_b_a(tmp_path, tok512):
    base = make_base(tmp_path / "base", tok512)
    final, model = make_run(tmp_path / "run", base, "lora", dict(r=2, alpha=3))
    convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)
    exported = load_state_dict(tmp_path / "hf" / "model.safetensors")
    layer = model.transformer.h[1].attn.q_proj
    expected = layer.linear.weight + (layer.lora_B @ layer.lora_A) * (3 / 2)
    assert torch.allclose(exported["model.layers.1.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(exported["model.layers.1.self_attn.k_proj.weight"], model.transformer.h[1].attn.k_proj.weight)


def test_a_quantized_training_merges_into_the_full_precision_base_with_a_note(tmp_path, tok512, capsys):
    base = make_base(tmp_path / "base", tok512)
    final, model = make_run(tmp_path / "run", base, "lora", recorded_quantize="bnb.nf4")
    convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True, dtype="bfloat16")
    assert "trained against a bnb.nf4-quantized base" in capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="quantized HF folder is not written"):
        convert_to_hf(tmp_path / "hf2", adapter_dir=final, merge_adapter=True, quantize="bnb.nf4")


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: one line each, before anything is written


def _nonzero_gates(model):
    for name, param in model.named_parameters():
        if "gating_factor" in name:
            param.fill_(0.5)


@pytest.mark.parametrize("method, settings, edit, fragment", [
    ("adapter_v2", dict(prompt_length=2, start_layer=1), None, "adaption prompts (layer 1) have non-zero gates"),
    ("adapter", dict(prompt_length=2, start_layer=0), _nonzero_gates, "adaption prompts (layers 0-1) have non-zero"),
    ("adapter_v2", dict(prompt_length=2, start_layer=1), _zero_gates, "trained bias (lm_head.adapter_bias)"),
    ("bitfit", dict(head=True), None, "(lm_head.bitfit_bias), and LlamaForCausalLM's lm_head has none"),
    ("houlsby", None, None, "bottleneck adapters"),
    ("pfeiffer", None, None, "bottleneck adapters"),
], ids=["v2-prompts", "v1-prompts", "v2-head-bias", "bitfit-head-bias", "houlsby", "pfeiffer"])
def test_what_llama_cannot_express_is_refused_naming_why(tmp_path, tok512, method, settings, edit, fragment):
    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, method, settings, edit=edit)
    with pytest.raises(UserError) as err:
        convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)
    message = str(err.value)
    assert fragment in message and f"cannot merge {method}" in message and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_a_base_that_does_not_fit_the_run_is_one_line_naming_the_keys(tmp_path, tok512):
    from safetensors.torch import save_file

    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, "lora")
    weights = load_state_dict(base / "lit_model.safetensors")
    weights["transformer.h.0.attn.q_proj.weight"] = weights["transformer.h.0.attn.q_proj.weight"][:, :16].clone()
    weights["transformer.h.9.attn.q_proj.weight"] = torch.zeros(1)
    save_file(weights, str(base / "lit_model.safetensors"))
    with pytest.raises(UserError) as err:
        convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)
    assert str(err.value) == (
        f"the checkpoint {base} does not fit this model: 1 unexpected keys: transformer.h.9.attn.q_proj.weight; "
        "1 shape mismatches: transformer.h.0.attn.q_proj.weight: checkpoint (32, 16) vs model (32, 32). "
        "Is it the base this run was trained on?")
    assert not (tmp_path / "hf").exists()


def test_sparse_attention_is_refused(tmp_path, tok512):
    from lit_adapter.model.attention import AttentionConfig

    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, "lora", attention=AttentionConfig(pattern="local", window=8))
    with pytest.raises(UserError, match="trained with local sparse attention"):
        convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)


def test_a_sparse_kernel_answers_for_itself_when_the_structure_is_asked():
    """Behind the run-level refusal above, the kernel module itself says why LLaMA cannot hold it
    (``tuners.base.FoldAnswer``): the exporter lists no attention class."""
    from lit_adapter.model.attention import AttentionConfig
    from lit_adapter.export.source import inspect_structure
    from lit_adapter.tuners.registry import build_model

    spec = MethodSpec("lora", attention=AttentionConfig(pattern="local", window=8))
    with torch.device("meta"):
        model = build_model(spec, Config.from_name("tiny"))
    structure = inspect_structure(model)
    assert set(structure.answering) == {f"transformer.h.{i}.attn.attention_kernel" for i in range(2)}
    assert structure.unknown == [] and len(structure.wrappers) == 4  # q_proj and v_proj of both layers
    answer = structure.answering["transformer.h.0.attn.attention_kernel"]
    assert answer.fold_label == "attention" and "attends densely" in answer.fold_refusal()


@pytest.fixture
def cli(capsys):
    """Runs a script in this process as ``python script args...`` would: (exit status, stdout, stderr)."""

    def invoke(script, *args):
        capsys.readouterr()
        argv, sys.argv = sys.argv, [str(REPO / script), *map(str, args)]
        code = 0
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = argv
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def test_bad_input_is_one_line_on_the_command_line(cli, tmp_path, tok512):
    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, "lora")
    script = "scripts/convert_to_hf.py"

    def error(*args):
        code, out, err = cli(script, *args)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    target = tmp_path / "hf"
    assert cli(script, "--checkpoint_dir", base, "--output_dir", target)[0] == 0
    assert "is not empty; pass --overwrite true" in error("--checkpoint_dir", base, "--output_dir", target)
    before = sorted(p.name for p in target.iterdir())
    assert cli(script, "--adapter_dir", final, "--merge", "true", "--output_dir", target, "--overwrite", "true")[0] == 0
    assert sorted(p.name for p in target.iterdir()) == before
    assert not list(tmp_path.glob(".hf.export-*"))  # the temporary folders are gone
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert "would replace" in error("--checkpoint_dir", base, "--output_dir", tmp_path, "--overwrite", "true")
    assert "needs --merge true" in error("--adapter_dir", final, "--output_dir", tmp_path / "x")
    assert "needs --adapter_dir" in error("--checkpoint_dir", base, "--merge", "true", "--output_dir", tmp_path / "x")
    assert "not a size" in error("--checkpoint_dir", base, "--max_shard_size", "lots", "--output_dir", tmp_path / "x")
    assert "quantized HF folder" in error("--checkpoint_dir", base, "--quantize", "bnb.nf4", "--output_dir",
                                          tmp_path / "x")
    merge = ("--merge", "true", "--output_dir", tmp_path / "x")
    assert "fine-tuned folder not found" in error("--adapter_dir", tmp_path / "nowhere", *merge)
    broken = tmp_path / "broken"
    broken.mkdir()
    assert "adapter_config.json is missing" in error("--adapter_dir", broken, *merge)
    (broken / "adapter_config.json").write_text("{not json")
    assert "is not valid JSON" in error("--adapter_dir", broken, *merge)
    (broken / "adapter_config.json").write_text((final / "adapter_config.json").read_text())
    assert "adapter weights not found" in error("--adapter_dir", broken, *merge)
    (broken / "adapter.safetensors").write_bytes(b"\0" * 20)
    assert "cannot read weights file" in error("--adapter_dir", broken, *merge)
    other = make_base(tmp_path / "other", tok512, "tiny-gqa")
    assert "trained on another base" in error("--adapter_dir", final, "--checkpoint_dir", other, *merge)
    assert not (tmp_path / "x").exists()
