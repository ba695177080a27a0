"""Multi-task instruction tuning (issue 27): prepared data keep each example's task category, validation reports
the loss per category (token-weighted, summing back to the overall loss), ``--data.category_weights`` sets the
training mix as a pure function of (seed, step), and ``eval.prompts_per_category`` draws a fixed sample per task."""

import csv
import json
import os
import signal

import pytest
import torch

from lit_adapter.data.instructions import UNKNOWN_CATEGORY, category_counts, load_prepared, prepare
from lit_adapter.data.order import CategoryWeightedSampler, StepBatchSampler, category_mix
from lit_adapter.errors import UserError
from lit_adapter.memory import Cell, build_random_model
from lit_adapter.train import run as training
from lit_adapter.train.fabric_setup import make_fabric
from lit_adapter.train.objectives import NEXT_TOKEN
from lit_adapter.train.trainer import validate
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune

DOLLY_LIKE = [
    {"instruction": f"Question {i}?", "context": "Some context." if i % 3 == 0 else "", "response": f"Answer {i}.",
     "category": category}
    for i, category in enumerate(["open_qa"] * 30 + ["closed_qa"] * 20 + ["creative_writing"] * 10)
]


@pytest.fixture(scope="module")
def dolly_like(tmp_path_factory, stories_checkpoint):
    folder = tmp_path_factory.mktemp("dolly_like")
    source = folder / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in DOLLY_LIKE))
    prepare(folder / "prepared", stories_checkpoint, source=source, val_size=15, seed=1, max_seq_length=160,
            progress=False, log=lambda *_: None)
    return folder / "prepared"


def test_prepared_dolly_keeps_each_examples_category(dolly_like):
    train, val, metadata = load_prepared(dolly_like)
    assert {ex["category"] for ex in train + val} == {"open_qa", "closed_qa", "creative_writing"}
    counts = {name: metadata["categories"]["train"].get(name, 0) + metadata["categories"]["val"].get(name, 0)
              for name in ("open_qa", "closed_qa", "creative_writing")}
    assert counts == {"open_qa": 30, "closed_qa": 20, "creative_writing": 10}
    assert metadata["categories"]["val"] == category_counts(val)
    # written as plain strings beside the tensors: the safe loader still reads the files
    assert isinstance(torch.load(dolly_like / "val.pt", weights_only=True)[0]["category"], str)


def test_old_prepared_folders_without_categories_read_as_unknown(tmp_path, dolly_like):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("train.pt", "val.pt"):  # what prepare wrote before categories were kept
        examples = torch.load(dolly_like / name, weights_only=True)
        torch.save([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples], old / name)
    metadata = json.loads((dolly_like / "metadata.json").read_text())
    metadata.pop("categories")
    (old / "metadata.json").write_text(json.dumps(metadata))
    train, val, _ = load_prepared(old)
    assert {ex["category"] for ex in train + val} == {UNKNOWN_CATEGORY}
    assert training.validation_categories(val) == ()  # one category: the overall loss says it all


def test_synthetic_records_carry_their_task_as_category(instruction_data):
    _, val, _ = load_prepared(instruction_data)
    assert {"add", "reverse"} <= {ex["category"] for ex in val}


def test_per_category_losses_sum_back_to_the_overall_loss_weighted_by_target_tokens(dolly_like):
    torch.manual_seed(0)
    cell = Cell(method="lora", model_name="stories260K", seq_len=160, micro_batch_size=4, precision="32-true",
                device="cpu", method_settings={"r": 4, "alpha": 8, "dropout": 0.0})
    model = build_random_model(cell, torch.device("cpu"))
    fabric = make_fabric("cpu", precision="32-true")
    model = fabric.setup(model)
    _, val, _ = load_prepared(dolly_like)
    batches = [NEXT_TOKEN.collate(val[i:i + 4], pad_id=0) for i in range(0, len(val), 4)]
    assert any(len(set(b["category"])) > 1 for b in batches)  # mixed batches are split, not skipped
    categories = training.validation_categories(val)
    by_category = {}
    overall = validate(fabric, model, batches, None, categories=categories, by_category=by_category)
    plain = validate(fabric, model, [{k: b[k] for k in ("input_ids", "labels")} for b in batches], None)

    # independently: every example on its own, its summed token loss and its target-token count
    sums, counts = {}, {}
    model.eval()
    with torch.no_grad():
        for ex in val:
            ids = ex["input_ids"][None]
            logits = model(ids)
            targets = ex["labels"][1:]
            token_losses = torch.nn.functional.cross_entropy(logits[0, :-1].double(), targets, ignore_index=-100,
                                                             reduction="sum")
            sums[ex["category"]] = sums.get(ex["category"], 0.0) + float(token_losses)
            counts[ex["category"]] = counts.get(ex["category"], 0) + int((targets != -100).sum())
    assert set(by_category) == set(categories) == set(sums)
    for name, (loss, n) in by_category.items():
        assert n == counts[name]
        assert loss == pytest.approx(sums[name] / counts[name], rel=1e-5)
    weighted = sum(loss * n for loss, n in by_category.values()) / sum(n for _, n in by_category.values())
    assert overall == pytest.approx(weighted, rel=1e-12)
    assert overall == pytest.approx(plain, rel=1e-6)  # the same number as validation without categories
    assert overall == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)


def test_category_weights_change_the_sampled_mix_as_stated():
    names = ["a"] * 300 + ["b"] * 100 + ["c"] * 100
    weights = {"a": 1.0, "b": 3.0, "c": 0.0}
    # shares n_c * w_c / sum: a 300, b 300, c 0
    assert category_mix(names, weights) == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert category_mix(names, {}) == {"a": 0.6, "b": 0.2, "c": 0.2}  # the default: the natural mix
    sampler = CategoryWeightedSampler(names, weights, micro_batch_size=8, accum=1, world_size=1, rank=0, seed=5,
                                      start_step=0, total_steps=500)
    drawn = [names[i] for batch in sampler for i in batch]
    assert len(drawn) == 4000 and "c" not in drawn
    assert drawn.count("b") / len(drawn) == pytest.approx(0.5, abs=0.03)


def test_weighted_order_is_a_pure_function_of_seed_and_step():
    names = ["a"] * 70 + ["b"] * 30
    kw = dict(micro_batch_size=4, accum=2, world_size=1, rank=0, seed=11)
    whole = list(CategoryWeightedSampler(names, {"b": 2.0}, start_step=0, total_steps=40, **kw))
    tail = list(CategoryWeightedSampler(names, {"b": 2.0}, start_step=17, total_steps=40, **kw))
    assert tail == whole[17 * 2:]  # epochs (12 steps each) cross at steps 24 and 36
    # the default sampler is untouched: each example once per epoch
    plain = list(StepBatchSampler(100, 4, 2, 1, 0, 11, 0, 12))
    assert len({i for batch in plain[:24] for i in batch}) == 96


def _run(out_dir, checkpoint, data_dir, steps=8, resume=False, weights=None, logger="csv", **eval_kw):
    spec = MethodSpec("adapter_v2", settings=AdapterConfig(start_layer=0))
    train = TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=steps, warmup_steps=2, learning_rate=1e-2,
                      log_interval=1, seed=7)
    return finetune(spec, checkpoint_dir=checkpoint, model_name=None, out_dir=out_dir,
                    data=DataArgs(data_dir=data_dir, category_weights=weights), train=train,
                    eval=EvalArgs(interval=4, **eval_kw), fabric_args=FabricArgs(accelerator="cpu"),
                    logger=LoggerArgs(logger_name=logger), resume=resume)


def test_weighted_run_records_its_mix_logs_losses_per_category_and_resumes_bit_exactly(
        tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    weights = {"add": 4.0, "reverse": 0.0}
    whole = _run(tmp_path / "whole", stories_checkpoint, instruction_data, weights=weights)
    hparams = json.loads((tmp_path / "whole/hparams.json").read_text())
    assert hparams["data"]["category_weights"] == weights
    mix = hparams["category_mix"]
    assert mix["reverse"] == 0.0 and max(mix, key=mix.get) == "add"
    summary = json.loads((tmp_path / "whole/summary.json").read_text())
    final = summary["final_val_loss_by_category"]
    assert {"add", "reverse"} <= set(final) and summary["initial_val_loss_by_category"].keys() == final.keys()
    assert [s for s, _ in summary["val_category_losses"]] == [0, 4, 8]
    (metrics_file,) = (tmp_path / "whole").glob("logs/version_*/metrics.csv")
    with open(metrics_file) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("val_loss/add")]
    assert len(logged) == 3 and float(logged[-1]["val_loss/add"]) == pytest.approx(final["add"])

    original = training.lr_at
    fired = []

    def interrupt_after_step_4(step, total, train):
        if step == 4 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, total, train)

    monkeypatch.setattr(training, "lr_at", interrupt_after_step_4)
    with pytest.raises(SystemExit):
        _run(tmp_path / "split", stories_checkpoint, instruction_data, weights=weights)
    monkeypatch.setattr(training, "lr_at", original)
    resumed = _run(tmp_path / "split", stories_checkpoint, instruction_data, weights=weights, resume=True)
    assert resumed.train_losses == whole.train_losses
    assert resumed.final_val_loss_by_category == whole.final_val_loss_by_category
    plain = _run(tmp_path / "plain", stories_checkpoint, instruction_data)
    assert plain.train_losses != whole.train_losses  # the weights did change what was trained on


@pytest.mark.parametrize("weights, message", [({"poetry": 1.0}, "not a category"), ({"add": -1.0}, ">= 0")])
def test_bad_category_weights_are_one_line(tmp_path, stories_checkpoint, instruction_data, weights, message):
    with pytest.raises(UserError, match=message):
        _run(tmp_path / "bad", stories_checkpoint, instruction_data, weights=weights, steps=1)


def test_the_grids_per_category_columns_table_and_heatmap_are_written(tmp_path):
    from lit_adapter.grid.report import write_results

    def row(name, seed, status, final=None, initial=None):
        done = status == "completed"
        return {"name": f"{name}/s{seed}", "group": name, "run": name, "method": name, "attention": "dense",
                "quantize": "none", "context": 128, "seed": seed, "status": status,
                "trainable_params": 100 if done else None, "val_loss": 2.0 if done else None,
                "avg_train_loss": 2.5 if done else None, "avg_val_loss": 2.2 if done else None,
                "initial_val_loss": 3.0, "train_time_s": 5.0, "tokens_per_s": 10.0, "peak_memory_gb": 0.5,
                "train_losses": [(1, 3.0), (2, 2.5)] if done else [], "val_losses": [(0, 3.0), (2, 2.0)],
                "val_loss_by_category": final or {}, "initial_val_loss_by_category": initial or {},
                "reason": "" if done else "CUDA out of memory"}

    start = {"open_qa": 3.0, "creative_writing": 3.5}
    rows = [row("adapter", 1, "completed", {"open_qa": 2.0, "creative_writing": 3.0}, start),
            row("adapter", 2, "completed", {"open_qa": 2.2, "creative_writing": 3.2}, start),
            row("lora", 1, "completed", {"open_qa": 2.5, "creative_writing": 2.9}, start),
            row("qlora", 1, "OOM")]
    paths = write_results(rows, tmp_path, "multi-task", meta={"machine": "m", "date": "d", "commit": "c"})
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert float(table[2]["val_loss/creative_writing"]) == 2.9 and table[3]["val_loss/open_qa"] == ""
    groups = {g["group"]: g for g in json.loads(paths["json"].read_text())["groups"]}
    assert groups["adapter"]["val_loss_by_category"]["open_qa"][0] == pytest.approx(2.1)
    assert groups["lora"]["val_loss_change_by_category"]["creative_writing"][0] == pytest.approx(-0.6)
    assert groups["qlora"]["val_loss_by_category"] == {}
    md = paths["md"].read_text()
    assert "## Final validation loss by task category" in md
    assert "| open_qa | 2.1000 ± 0.1414 (-0.9000 ± 0.1414) | 2.5000 (-0.5000) | — (—) |" in md
    assert paths["heatmap"].stat().st_size > 10_000 and paths["dashboard"].is_file()
    assert "category_heatmap.png" not in paths["html"].read_text() and "Final validation loss by task" in \
        paths["html"].read_text()


def test_a_grid_without_categories_writes_no_heatmap(tmp_path):
    from lit_adapter.grid.report import write_results

    rows = [{"name": "a", "status": "completed", "context": 128, "val_loss": 2.0, "train_losses": [(1, 2.0)],
             "val_losses": [(1, 2.0)]}]
    paths = write_results(rows, tmp_path, "one task", meta={"machine": "m", "date": "d", "commit": "c"})
    assert "heatmap" not in paths and not (tmp_path / "category_heatmap.png").exists()
    assert "by task category" not in paths["md"].read_text()


def test_eval_prompts_draw_a_fixed_sample_per_category(tmp_path, stories_checkpoint, dolly_like):
    from lit_adapter.data.instructions import category_sample

    _, val, _ = load_prepared(dolly_like)
    sample = category_sample(val, 2)
    counts = category_counts(val)
    assert [ex["category"] for ex in sample] == [c for c in counts for _ in range(min(2, counts[c]))]
    assert category_sample(val, 2) == sample  # fixed: the first of each category in the seeded validation split
    _run(tmp_path / "run", stories_checkpoint, dolly_like, steps=2, prompts=["Add 2 and 3."], prompts_per_category=2,
         prompt_max_new_tokens=4)
    written = [json.loads(line) for line in (tmp_path / "run/generations.jsonl").read_text().splitlines()]
    assert written[0]["prompt"] == "Add 2 and 3." and written[0]["category"] == ""
    assert [g["category"] for g in written[1:]] == [ex["category"] for ex in sample]
    for g, ex in zip(written[1:], sample):
        # the example's own prompt, as trained on, and its reference response
        assert g["prompt"].startswith("Below is an instruction") and g["prompt"].endswith("### Response:\n")
        assert g["reference"].startswith("Answer") and g["reference"].endswith(".")
