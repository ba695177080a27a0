import os
import shutil

import pytest
import torch

from lit_adapter.checkpoint import (
    base_key,
    check_keys,
    find_weights,
    load_checkpoint_dir,
    load_state_dict,
    load_weights_into,
    model_key,
    save_state_dict,
    to_model_keys,
)
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT


def random_model(name="tiny", **overrides) -> GPT:
    model = GPT(Config.from_name(name, **overrides))
    model.init_weights()
    return model.eval()


def write_checkpoint_dir(path, model, shared_data, weights="lit_model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "model_config.json")
    save_state_dict(model.state_dict(), path / weights)
    shutil.copyfile(shared_data / "tokenizers" / "llama" / "tokenizer.model", path / "tokenizer.model")
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_round_trip_with_tied_weights(tmp_path, suffix):
    model = random_model(tie_embeddings=True)
    state_dict = model.state_dict()
    assert state_dict["lm_head.weight"].data_ptr() == state_dict["transformer.wte.weight"].data_ptr()
    path = tmp_path / f"weights{suffix}"
    save_state_dict(state_dict, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(loaded[k], v), k
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_load_legacy_torch_format(tmp_path):
    # torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; old HF pytorch_model.bin files use it
    state_dict = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save(state_dict, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    loaded = load_state_dict(tmp_path / "old.bin")
    assert torch.equal(loaded["a"], state_dict["a"]) and torch.equal(loaded["b"], state_dict["b"])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "lit_model.safetensors"
    save_state_dict({"a": torch.ones(3)}, path)

    def failing_save(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": torch.zeros(3)}, path)
    assert torch.equal(load_state_dict(path)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_find_weights_prefers_safetensors(tmp_path):
    with pytest.raises(UserError, match=r"no weights in .*: expected lit_model.safetensors or lit_model.pth"):
        find_weights(tmp_path)
    with pytest.raises(UserError, match="checkpoint directory not found"):
        find_weights(tmp_path / "missing")
    save_state_dict({"a": torch.ones(1)}, tmp_path / "lit_model.pth")
    assert find_weights(tmp_path).name == "lit_model.pth"
    save_state_dict({"a": torch.ones(1)}, tmp_path / "lit_model.safetensors")
    assert find_weights(tmp_path).name == "lit_model.safetensors"


@pytest.mark.parametrize("name", ["lit_model.safetensors", "lit_model.pth"])
def test_corrupt_weights_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(UserError, match=f"cannot read weights file .*{name}"):
        load_state_dict(path)
    with pytest.raises(UserError, match="weights file not found"):
        load_state_dict(tmp_path / "other.pth")


@pytest.mark.parametrize("tied", [False, True])
def test_load_into_meta_model_gives_same_logits(tied):
    source = random_model("tiny-gqa", tie_embeddings=tied)
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    if tied:
        del state_dict["lm_head.weight"]  # a tied checkpoint may omit the head
    with torch.device("meta"):
        model = GPT(source.config)
    assert load_weights_into(model, state_dict) == []
    assert model.transformer.wte.weight.device.type == "cpu"
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    idx = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(model(idx), source(idx), rtol=0, atol=0)


def test_load_errors_name_the_keys():
    model = random_model("tiny")
    state_dict = dict(model.state_dict())
    missing = {k: v for k, v in state_dict.items() if "h.1." not in k}
    with pytest.raises(UserError) as err:
        load_weights_into(random_model("tiny"), missing)
    message = str(err.value)
    assert "9 missing keys: transformer.h.1.norm_1.weight, transformer.h.1.attn.q_proj.weight" in message
    assert "(and 4 more)" in message and "Is model_config.json the config" in message

    extra = dict(state_dict, **{"transformer.h.2.norm_1.weight": torch.ones(32)})
    with pytest.raises(UserError, match=r"1 unexpected keys: transformer.h.2.norm_1.weight"):
        load_weights_into(random_model("tiny"), extra)

    wide = random_model("tiny", n_embd=64, n_head=4).state_dict()
    with pytest.raises(UserError) as err:
        load_weights_into(random_model("tiny"), wide, source="checkpoint x")
    assert (
        "the checkpoint x does not fit the model: 21 shape mismatches: "
        "transformer.wte.weight: checkpoint (512, 64) vs model (512, 32)"
    ) in str(err.value)

    tied = random_model("tiny", tie_embeddings=True)
    different = dict(state_dict)  # an untied checkpoint whose head differs from its embedding
    with pytest.raises(UserError, match="ties lm_head.weight to transformer.wte.weight"):
        load_weights_into(tied, different)


def test_allow_missing_returns_the_keys_left_out():
    source = random_model("tiny")
    partial = {k: v for k, v in source.state_dict().items() if not k.endswith("norm_2.weight")}
    model = random_model("tiny")
    left = load_weights_into(model, partial, allow_missing=lambda k: k.endswith("norm_2.weight"))
    assert left == ["transformer.h.0.norm_2.weight", "transformer.h.1.norm_2.weight"]


def test_load_checkpoint_dir(tmp_path, shared_data):
    source = random_model("tiny-32k", tie_embeddings=True)
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", source, shared_data)
    config, model, tokenizer = load_checkpoint_dir(ckpt)
    assert config == source.config and not model.training
    assert tokenizer.vocab_size == 32000
    idx = tokenizer.encode("Once upon a time")[None]
    torch.testing.assert_close(model(idx), source(idx), rtol=0, atol=0)

    _, half, _ = load_checkpoint_dir(ckpt, dtype=torch.bfloat16)
    assert half.transformer.wte.weight.dtype == torch.bfloat16 and half.lm_head.weight is half.transformer.wte.weight
    torch.testing.assert_close(half(idx).float(), source(idx), rtol=0.05, atol=0.05)


def test_load_checkpoint_dir_errors(tmp_path, shared_data):
    with pytest.raises(UserError, match="checkpoint directory not found"):
        load_checkpoint_dir(tmp_path / "missing")
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", random_model("tiny"), shared_data)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="has no tokenizer.model"):
        load_checkpoint_dir(ckpt)
    (ckpt / "model_config.json").unlink()
    with pytest.raises(UserError, match="has no model_config.json"):
        load_checkpoint_dir(ckpt)

    # weights that do not fit the config: model_config.json says another width
    ckpt = write_checkpoint_dir(tmp_path / "edited", random_model("tiny"), shared_data)
    Config.from_name("tiny", n_embd=64).save(ckpt / "model_config.json")
    expected = r"lit_model.safetensors does not fit the model: 21 shape mismatches: transformer.wte.weight: "
    with pytest.raises(UserError, match=expected + r"checkpoint \(512, 32\) vs model \(512, 64\)"):
        load_checkpoint_dir(ckpt)


def test_the_one_key_checker_names_the_offending_keys():
    expected = {f"layer.{i}.weight": torch.zeros(2, 3) for i in range(8)}
    given = {k: v for k, v in expected.items() if k not in ("layer.1.weight", "layer.7.weight")}
    given.update({"layer.0.weight": torch.zeros(3, 3), "layer.2.weight": [1, 2], "extra.lora_A": torch.zeros(1)})
    with pytest.raises(UserError) as err:
        check_keys(expected, given, "the lora weights in x do not fit this base model", "Were they trained here?")
    assert str(err.value) == (
        "the lora weights in x do not fit this base model: 2 missing keys: layer.1.weight, layer.7.weight; "
        "1 unexpected keys: extra.lora_A; 2 shape mismatches: layer.0.weight: checkpoint (3, 3) vs model (2, 3), "
        "layer.2.weight: checkpoint list vs model (2, 3). Were they trained here?")
    many = {f"extra.{i}": torch.zeros(1) for i in range(7)}
    shown = r"7 unexpected keys: extra.0, extra.1, extra.2, extra.3, extra.4 \(and 2 more\)$"
    with pytest.raises(UserError, match=shown):
        check_keys({}, many, "f")
    # allowed missing keys pass and are returned, in the model's order
    assert check_keys(expected, {"layer.3.weight": torch.ones(2, 3)}, "f", allow_missing=lambda k: True) == [
        k for k in expected if k != "layer.3.weight"]


def test_the_one_base_key_renamer():
    model_keys = {"h.0.attn.q_proj.linear.weight", "h.0.attn.q_proj.lora_A", "h.0.attn.k_proj.weight",
                  "h.0.attn.v_proj.linear.weight.absmax"}
    assert model_key("h.0.attn.q_proj.weight", model_keys) == "h.0.attn.q_proj.linear.weight"
    assert model_key("h.0.attn.k_proj.weight", model_keys) == "h.0.attn.k_proj.weight"  # not wrapped
    assert model_key("h.0.attn.v_proj.weight.absmax", model_keys) == "h.0.attn.v_proj.linear.weight.absmax"
    assert model_key("h.0.attn.o_proj.weight", model_keys) == "h.0.attn.o_proj.weight"  # unknown: unchanged
    assert base_key("h.0.attn.q_proj.linear.weight") == "h.0.attn.q_proj.weight"
    renamed = to_model_keys({"h.0.attn.q_proj.weight": torch.ones(1), "h.0.attn.k_proj.weight": torch.ones(1)},
                            model_keys)
    assert set(renamed) == {"h.0.attn.q_proj.linear.weight", "h.0.attn.k_proj.weight"}
