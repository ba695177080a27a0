"""configs/gpt2_lora_rotten_tomatoes.yaml (seed 004's system) runs end to end on a random tiny GPT-2: data
prepared with its byte-level BPE tokenizer, the LoRA cell trained, its best/ evaluated on the test split."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from family_fixtures import gpt2_tokenizer_dir
from lit_adapter.grid.classification_study import run_study
from lit_adapter.model.config import Config
from lit_adapter.convert import write_checkpoint_dir
from lit_adapter.model.gpt import GPT

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt2_lora_rotten_tomatoes.yaml"


def test_seed_004_settings():
    raw = yaml.safe_load(CONFIG.read_text())
    lora = next(r for r in raw["runs"] if r["script"] == "lora")["args"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (128, 512, 0.05)
    assert lora["query"] and lora["key"] and lora["value"]
    assert raw["common"]["train"]["learning_rate"] == 2.5e-4
    assert Config.from_name(Path(raw["checkpoint_dir"]).name).name == "gpt2-medium"


def test_the_gpt2_study_runs_on_a_tiny_gpt2(shared_data, tmp_path):
    tokenizer = gpt2_tokenizer_dir(tmp_path / "tok") / "tokenizer.json"
    config = Config.from_name("tiny-gpt2", block_size=512)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    base = write_checkpoint_dir(tmp_path / "base", config,
                                {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, tokenizer)
    raw = yaml.safe_load(CONFIG.read_text())
    raw["checkpoint_dir"], raw["out_dir"] = str(base), str(tmp_path / "out")
    raw["study"].update(data_dir=str(shared_data), max_train_examples=24, max_test_examples=6)
    raw["context_lengths"] = [512]
    raw["common"]["train"].update(global_batch_size=8, micro_batch_size=8, max_steps=2, warmup_steps=1,
                                  log_interval=1)
    raw["common"]["train"].pop("epochs")
    raw["common"]["eval"] = {"interval": 1, "max_batches": 1}
    raw["common"]["fabric"] = {"accelerator": "cpu", "precision": "32-true"}
    raw["runs"] = [r for r in raw["runs"] if r["script"] == "lora"]  # one cell (a process of its own)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    report = run_study(tmp_path / "study.yaml")
    assert [c["status"] for c in report["cells"]] == ["completed"]
    cell = report["cells"][0]
    assert cell["evaluated"] == "best" and cell["test"]["examples"] == 6
    assert cell["test"]["correct"] + cell["test"]["no_answer"] <= 6
