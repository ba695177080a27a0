"""A training run as its WandB dashboard will show it: real wandb in offline mode, the run's ``.wandb`` transaction
log read back (tests/wandb_reader.py) for the group, tags, config, summary, curves' axes, the generations table and
the model artifact; failed and out-of-memory runs are runs too, with their status."""

import json
import os
import signal

import pytest
import torch

from lit_adapter.train import losses
from lit_adapter.model.attention import AttentionConfig
from lit_adapter.data.order import StepBatchSampler
from lit_adapter.train.guards import LossNotFinite
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.tuners.lora import LoRAConfig
from lit_adapter.tuners.prompt_tuning import PromptTuningConfig
import test_reliability
from test_reliability import assert_one_error_line, finetune_args
from wandb_reader import offline_runs

PROMPTS = ["Add 2 and 3.", "Name a colour of the sky."]
cli = test_reliability.cli  # the fixture: a command line run in this process


@pytest.fixture(scope="module", autouse=True)
def _offline():
    import wandb

    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    wandb.teardown()  # wandb reads WANDB_MODE once per process, when it first sets up: set it up again offline
    yield
    wandb.teardown()
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def cell(out_dir, checkpoint, data_dir, steps=3, prompts=(), log_artifacts=False, run_id="cell-0001", resume=False,
         **train):
    args = dict(global_batch_size=8, micro_batch_size=4, max_steps=steps, warmup_steps=1, learning_rate=1e-2, seed=7)
    args.update(train)
    return finetune(
        MethodSpec("lora", settings=LoRAConfig(r=4)), checkpoint_dir=checkpoint, model_name=None, out_dir=out_dir,
        data=DataArgs(data_dir=data_dir), train=TrainArgs(**args),
        eval=EvalArgs(interval=2, max_batches=1, prompts=list(prompts), prompt_max_new_tokens=6),
        fabric_args=FabricArgs(accelerator="cpu", precision="32-true"),
        logger=LoggerArgs(logger_name="wandb", project="unit", group="grid-a", job_type="lora-160",
                          tags=["lora", "dense", "none", "ctx-160", "seed-7"], run_id=run_id,
                          log_artifacts=log_artifacts),
        resume=resume,
    )


def test_a_cell_is_one_run_with_its_group_tags_config_summary_axes_table_and_model(
        tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "cell"
    result = cell(out, stories_checkpoint, instruction_data, prompts=PROMPTS, log_artifacts=True)
    assert result.status == "completed"
    (run,) = offline_runs(out)
    # identity: the grid's group, the cell as job type, its tags and id
    assert (run.run.run_id, run.run.project, run.run.run_group, run.run.job_type) == (
        "cell-0001", "unit", "grid-a", "lora-160")
    assert list(run.run.tags) == ["lora", "dense", "none", "ctx-160", "seed-7"]
    # the full resolved config, as hparams.json has it
    hparams = json.loads((out / "hparams.json").read_text())
    assert run.config["train"]["learning_rate"] == 1e-2 and run.config["method"]["settings"]["r"] == 4
    for key in ("train", "eval", "data", "fabric", "method", "checkpoint_dir", "precision", "trainable_params"):
        assert run.config[key] == hparams[key], key
    # the summary: summary.json's numbers, the status, the wall time
    summary = json.loads((out / "summary.json").read_text())
    assert run.summary["status"] == "completed" and run.exit_codes == [0]
    for key in ("final_val_loss", "best_val_loss", "best_val_step", "avg_train_loss", "tokens_per_s",
                "peak_memory_gb", "train_time_s", "trainable_params", "steps"):
        assert run.summary[key] == summary[key], key
    assert run.summary["final_val_loss"] == result.final_val_loss and run.summary["wall_time_s"] >= summary["train_time_s"]
    # curves against the optimizer step, tokens seen as a second axis on every train and validation row
    axes = {(m.name, m.glob_name, m.step_metric) for m in run.metrics}
    assert {("", "*", "trainer/global_step"), ("tokens", "", "")} <= axes
    train_rows = [r for r in run.history if "train_loss" in r]
    val_rows = [r for r in run.history if "val_loss" in r]
    assert [r["trainer/global_step"] for r in train_rows] == [1, 2, 3]
    assert [r["train_loss"] for r in train_rows] == pytest.approx([loss for _, loss in result.train_losses])
    tokens = [r["tokens"] for r in train_rows]
    assert tokens == expected_tokens(instruction_data, steps=3)
    assert [(r["trainer/global_step"], r["tokens"]) for r in val_rows] == [(0, 0), (2, tokens[1]), (3, tokens[2])]
    assert [r["val_loss"] for r in val_rows] == pytest.approx([loss for _, loss in result.val_losses])
    # the fixed prompts, answered by the final model: generations.jsonl and the table hold the same rows
    written = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["step"], g["prompt"]) for g in written] == [(3, p) for p in PROMPTS]
    table = run.table("generations")
    assert table["columns"] == ["step", "category", "prompt", "reference", "response"]
    assert table["data"] == [[g["step"], g["category"], g["prompt"], g["reference"], g["response"]] for g in written]
    # the synthetic tasks are categories: each validation also logs each task's loss, the summary the final ones
    # (those in the validated batches)
    assert all(any(key.startswith("val_loss/") for key in r) for r in val_rows)
    assert result.final_val_loss_by_category
    for name, loss in result.final_val_loss_by_category.items():
        assert run.summary[f"final_val_loss/{name}"] == pytest.approx(loss)
    from lit_adapter.cli.generate import generate_instruction_answer

    for g in written:  # what generate/lora.py answers greedily with final/
        (answer,) = generate_instruction_answer(stories_checkpoint, out / "final", instruction=g["prompt"],
                                                max_new_tokens=6, temperature=0.0, stream=False, device="cpu")
        assert g["response"] == answer.strip()
    # best/ as a model artifact, its metadata the summary
    (model,) = [a for a in run.artifacts if a.type == "model"]
    assert model.name == "model-cell-0001"
    assert sorted(c.path for c in model.manifest.contents) == sorted(
        f"best/{p.name}" for p in (out / "best").iterdir())
    assert {c.local_path for c in model.manifest.contents} == {str(p) for p in (out / "best").iterdir()}  # no copies
    metadata = json.loads(model.metadata)
    assert metadata["folder"] == "best" and metadata["best_val_loss"] == summary["best_val_loss"]


def expected_tokens(data_dir, steps, micro=4, accum=2, seed=7):
    """Positions processed after each step: packed (the default), the step's examples' own tokens, no padding."""
    examples = torch.load(data_dir / "train.pt", weights_only=True)
    batches = list(StepBatchSampler(len(examples), micro, accum, 1, 0, seed, 0, steps))
    per_batch = [sum(len(examples[i]["input_ids"]) for i in batch) for batch in batches]
    return [sum(per_batch[: (step + 1) * accum]) for step in range(steps)]


class _Poison:
    """Fault injection into the real loss: from the given training forward on, NaN, or CUDA's out-of-memory error."""

    def __init__(self, after, error=None):
        # every training loss's cross-entropy (head on the target rows or not)
        self.after, self.error, self.calls, self.original = after, error, 0, losses.CrossEntropy.apply

    def __call__(self, rows, targets, ignore_index=-100, mean=True):
        loss = self.original(rows, targets, ignore_index, mean)
        if rows.requires_grad:
            self.calls += 1
            if self.calls > self.after:
                if self.error is not None:
                    raise self.error
                loss = loss * float("nan")
        return loss


@pytest.mark.parametrize("status", ["failed", "OOM"])
def test_a_failed_or_out_of_memory_cell_is_a_run_with_its_status(tmp_path, stories_checkpoint, instruction_data,
                                                                  monkeypatch, status):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if status == "OOM" else None
    monkeypatch.setattr(losses.CrossEntropy, "apply", _Poison(after=2, error=error))  # step 1 is clean, step 2 is not
    out = tmp_path / "cell"
    with pytest.raises(LossNotFinite if status == "failed" else torch.OutOfMemoryError):
        cell(out, stories_checkpoint, instruction_data, steps=4, prompts=PROMPTS, log_artifacts=True)
    (run,) = offline_runs(out)
    assert run.run.run_id == "cell-0001" and run.exit_codes == [1]
    assert run.summary["status"] == status
    assert ("loss became nan at step 2" if status == "failed" else "OutOfMemoryError: CUDA out of memory") in \
        run.summary["reason"]
    # what was measured before the failure: step 0's validation, step 1's training loss
    assert run.summary["steps"] == 1
    assert run.summary["avg_train_loss"] == pytest.approx([r["train_loss"] for r in run.history
                                                           if "train_loss" in r][0])
    assert run.summary["final_val_loss"] == [r["val_loss"] for r in run.history if "val_loss" in r][0]
    assert run.config["train"]["learning_rate"] == 1e-2
    # no answers, no table, no model from a failed run
    assert not (out / "generations.jsonl").exists() and "generations" not in run.summary
    assert [a for a in run.artifacts if a.type == "model"] == []


@pytest.mark.parametrize("change, message", [
    (dict(project="grid/a"), "wandb could not start the run: Invalid project name 'grid/a'"),
    (dict(run_id="cell:1"), "wandb could not start the run: Run ID cannot contain"),
    (dict(tags=["x" * 65]), "logger.tags must be 1 to 64 characters each"),
])
def test_settings_wandb_refuses_are_one_line_errors(tmp_path, stories_checkpoint, instruction_data, change,
                                                       message):
    from lit_adapter.errors import UserError

    logger = LoggerArgs(logger_name="wandb", **change)
    with pytest.raises(UserError) as info:
        finetune(MethodSpec("lora"), checkpoint_dir=stories_checkpoint, model_name=None, out_dir=tmp_path / "cell",
                 data=DataArgs(data_dir=instruction_data), train=TrainArgs(global_batch_size=8, max_steps=1),
                 eval=EvalArgs(), fabric_args=FabricArgs(accelerator="cpu"), logger=logger)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("run_id", ["cell-0001", None])  # None: wandb's own id, kept in out_dir for --resume
def test_a_resumed_cell_continues_its_run_and_its_steps(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                        run_id):
    from lit_adapter.train import run as training

    original = training.lr_at

    def interrupt_after_step_2(step, total, train):
        if step == 2:  # asked right after optimizer step 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, total, train)

    out = tmp_path / "cell"
    monkeypatch.setattr(training, "lr_at", interrupt_after_step_2)
    with pytest.raises(SystemExit):
        cell(out, stories_checkpoint, instruction_data, steps=4, run_id=run_id)
    monkeypatch.setattr(training, "lr_at", original)
    cell(out, stories_checkpoint, instruction_data, steps=4, resume=True, run_id=run_id)
    first, second = offline_runs(out)  # offline, each process writes its part; wandb sync uploads both as one run
    assert first.run.run_id == second.run.run_id == (run_id or (out / "wandb_run_id").read_text().strip())
    assert (first.summary["status"], first.summary["steps"], first.exit_codes) == ("interrupted", 2, [0])
    assert (second.summary["status"], second.summary["steps"]) == ("completed", 4)
    steps = [r["trainer/global_step"] for run in (first, second) for r in run.history if "train_loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["trainer/global_step"] for r in second.history if "val_loss" in r] == [4]
    tokens = [r["tokens"] for run in (first, second) for r in run.history if "train_loss" in r]
    assert tokens == expected_tokens(instruction_data, steps=4)  # the count resumes with the checkpoint


@pytest.mark.parametrize("method, settings, quantize, attention", [
    ("prompt_tuning", PromptTuningConfig(num_virtual_tokens=4), None, None),  # virtual tokens before the prompt
    ("lora", LoRAConfig(r=2, alpha=4, dropout=0.0), "bnb.int8", None),  # a quantized base
    ("adapter", AdapterConfig(start_layer=0), None, AttentionConfig(pattern="shifted", group_size_ratio=0.25)),
])
def test_the_prompts_are_answered_by_every_method_with_any_logger(tmp_path, stories_checkpoint, instruction_data,
                                                                  method, settings, quantize, attention):
    from lit_adapter.cli.generate import generate_instruction_answer

    spec = MethodSpec(method, settings=settings, quantize=quantize, attention=attention or AttentionConfig())
    out = tmp_path / "run"
    finetune(spec, checkpoint_dir=stories_checkpoint, model_name=None, out_dir=out,
             data=DataArgs(data_dir=instruction_data),
             train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=2, warmup_steps=1, learning_rate=1e-2),
             eval=EvalArgs(interval=1000, max_batches=1, prompts=PROMPTS, prompt_max_new_tokens=5),
             fabric_args=FabricArgs(accelerator="cpu", precision="32-true"), logger=LoggerArgs())  # CSV
    written = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["step"], g["prompt"]) for g in written] == [(2, p) for p in PROMPTS]
    for g in written:
        (answer,) = generate_instruction_answer(stories_checkpoint, out / "final", instruction=g["prompt"],
                                                max_new_tokens=5, temperature=0.0, stream=False, device="cpu")
        assert g["response"] == answer.strip() and answer.strip()


def test_a_diverging_command_line_run_is_one_error_line_and_a_failed_run_to_sync(cli, tmp_path, stories_checkpoint,
                                                                                 instruction_data):
    out = tmp_path / "out"
    proc = cli(*finetune_args(stories_checkpoint, instruction_data, out, "--logger.logger_name", "wandb",
                              "--logger.group", "grid-a", "--train.learning_rate", "1e37", "--train.max_grad_norm",
                              "null", "--train.warmup_steps", "0", "--train.max_steps", "4"))
    assert_one_error_line(proc, "Lower train.learning_rate")
    assert "\x1b[" not in proc.stdout + proc.stderr and "anonymous" not in proc.stdout + proc.stderr
    (sync,) = [line for line in proc.stderr.splitlines() if line.startswith("wandb: offline run in")]
    (run,) = offline_runs(out)
    assert sync.endswith(f"wandb sync {run.folder}")
    assert run.summary["status"] == "failed" and "Lower train.learning_rate" in run.summary["reason"]
    assert run.run.run_group == "grid-a" and run.exit_codes == [1]


def test_disabled_wandb_runs_the_same_and_writes_no_run(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                        capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.teardown()  # (see _offline)
    out = tmp_path / "cell"
    try:
        result = cell(out, stories_checkpoint, instruction_data, steps=2, prompts=PROMPTS[:1], log_artifacts=True)
    finally:
        wandb.teardown()
    assert result.status == "completed" and len((out / "generations.jsonl").read_text().splitlines()) == 1
    assert list(out.glob("wandb/*run-*")) == [] and "wandb sync" not in capsys.readouterr().out


def test_a_cell_refused_before_its_first_step_is_a_run_with_status_error_and_its_config(tmp_path, stories_checkpoint,
                                                                                      instruction_data):
    from lit_adapter.errors import UserError

    out = tmp_path / "cell"
    with pytest.raises(UserError, match="fewer than one global batch of 1000"):
        cell(out, stories_checkpoint, instruction_data, global_batch_size=1000)
    (run,) = offline_runs(out)
    assert (run.summary["status"], run.exit_codes) == ("error", [1])
    assert run.summary["reason"].startswith("the training split has 360 examples, fewer than one global batch")
    assert run.config["train"]["global_batch_size"] == 1000 and run.run.job_type == "lora-160"
    assert "final_val_loss" not in run.summary  # nothing was measured


OOM_SCRIPT = """
import runpy, sys, torch
from lit_adapter.train import losses
def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
losses.CrossEntropy.apply = out_of_memory
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_process_that_dies_of_out_of_memory_leaves_a_complete_run_to_sync(tmp_path, stories_checkpoint,
                                                                            instruction_data):
    import subprocess
    import sys

    out = tmp_path / "out"
    args = finetune_args(stories_checkpoint, instruction_data, out, "--logger.logger_name", "wandb")
    proc = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(test_reliability.REPO / args[0]), *map(str, args[1:])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(
                              test_reliability.REPO)})
    assert proc.returncode == 1 and "OutOfMemoryError" in proc.stderr  # what the grid classifies as OOM
    (run,) = offline_runs(out)  # the process has exited: what wandb sync will upload
    assert (run.summary["status"], run.exit_codes) == ("OOM", [1])
    assert run.summary["reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"


def test_tokens_are_counted_at_every_step_whatever_the_log_interval(tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "cell"
    result = cell(out, stories_checkpoint, instruction_data, steps=3, log_interval=3)  # validation at 2, log at 3
    (run,) = offline_runs(out)
    expected = expected_tokens(instruction_data, steps=3)
    assert [(r["trainer/global_step"], r["tokens"]) for r in run.history if "train_loss" in r] == [(3, expected[2])]
    assert [(r["trainer/global_step"], r["tokens"]) for r in run.history if "val_loss" in r] == [
        (0, 0), (2, expected[1]), (3, expected[2])]
    assert result.tokens_per_s == pytest.approx(expected[2] / result.train_time_s)
