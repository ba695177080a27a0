"""Bad input and faults (issue 18): each general defect gets one ``error:`` line, a non-zero exit, no traceback,
and leaves earlier outputs as they were. Command-line cases run the real scripts in a subprocess; faults that
cannot be provoked from outside (an inf gradient, a full disk, a second signal mid-save) are injected in-process."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.train import losses
from lit_adapter.train import run as training
from lit_adapter.errors import UserError, run_cli
from lit_adapter.train.preflight import LOCK_FILE
from test_training import run

REPO = Path(__file__).resolve().parents[1]


class Finished:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Runs ``script`` as ``python script args...`` would, in this process (a subprocess spends ~4 s importing):
    its exit status and output; an exception that escapes is a traceback the user would have seen."""

    def invoke(script, *args):
        capsys.readouterr()
        argv = sys.argv
        sys.argv = [str(REPO / script), *map(str, args)]
        code = 0
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = argv
        out = capsys.readouterr()
        return Finished(code, out.out, out.err)

    return invoke


def subprocess_cli(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_one_error_line(proc, *fragments):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def finetune_args(checkpoint, data, out, *extra):
    return ("finetune/lora.py", "--checkpoint_dir", checkpoint, "--data.data_dir", data, "--out_dir", out,
            "--train.max_steps", 2, "--train.global_batch_size", 4, "--train.micro_batch_size", 2,
            "--train.warmup_steps", 1, "--eval.max_batches", 1, "--fabric.accelerator", "cpu", *extra)


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts}


# ---------------------------------------------------------------------------------------------- non-finite values

class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("clipping", [1.0, None])
def test_non_finite_gradients_stop_before_the_update_naming_a_finite_checkpoint(
        tmp_path, stories_checkpoint, instruction_data, monkeypatch, clipping):
    calls = {"n": 0}
    original = losses.CrossEntropy.apply  # every training loss's cross-entropy (head on the target rows or not)

    def poisoned(rows, targets, ignore_index=-100, mean=True):
        loss = original(rows, targets, ignore_index, mean)
        if rows.requires_grad:
            calls["n"] += 1
            if calls["n"] > 4:  # steps 1-2 are clean (2 micro-batches each), step 3's gradient overflows
                loss = _InfGradient.apply(loss)
        return loss

    monkeypatch.setattr(losses.CrossEntropy, "apply", poisoned)
    with pytest.raises(training.LossNotFinite, match=r"gradients became non-finite .* at step 3; no update was "
                                                     r"applied; the last good checkpoint is .* \(step 2"):
        run(tmp_path, stories_checkpoint, instruction_data, steps=6, save_interval=2, max_grad_norm=clipping)
    state = torch.load(tmp_path / training.CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "final").exists()


def test_a_diverging_run_leaves_a_checkpoint_that_resumes(tmp_path, stories_checkpoint, instruction_data):
    """A learning rate so large that the update blows the weights up (AdamW's decoupled decay multiplies them by
    1 - lr * weight_decay): finite checkpoints can still be poison. Whatever last.ckpt is left must resume."""
    with pytest.raises(training.LossNotFinite, match="non-finite|overflowed|loss became") as info:
        run(tmp_path, stories_checkpoint, instruction_data, steps=6, save_interval=1, learning_rate=1e37,
            max_grad_norm=None, warmup_steps=0)
    checkpoint = tmp_path / training.CHECKPOINT_NAME
    if not checkpoint.exists():
        assert "no checkpoint known to be good" in str(info.value)
        return
    state = torch.load(checkpoint, weights_only=True)
    assert f"(step {state['step']}" in str(info.value)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    resumed = run(tmp_path, stories_checkpoint, instruction_data, steps=state["step"] + 2, resume=True,
                  learning_rate=1e-3)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in resumed.train_losses)


def test_a_finished_run_is_not_replaced_without_overwrite(cli, tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "run"
    first = cli(*finetune_args(stories_checkpoint, instruction_data, out))
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    again = cli(*finetune_args(stories_checkpoint, instruction_data, out))
    assert_one_error_line(again, "already holds a run", "--resume true", "--overwrite true")
    assert snapshot(out) == before
    replaced = cli(*finetune_args(stories_checkpoint, instruction_data, out, "--overwrite", "true"))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert snapshot(out)["final/adapter.safetensors"] != before["final/adapter.safetensors"]
    assert not (out / LOCK_FILE).exists()


def test_a_live_run_locks_its_folder_and_a_dead_ones_lock_is_taken_over(cli, tmp_path, stories_checkpoint,
                                                                        instruction_data):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        busy = cli(*finetune_args(stories_checkpoint, instruction_data, out))
        assert_one_error_line(busy, "in use by another run", str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / LOCK_FILE).write_text(f"{sleeper.pid}\n")  # its process is gone now
    taken = cli(*finetune_args(stories_checkpoint, instruction_data, out))
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert not (out / LOCK_FILE).exists()


def test_out_dir_that_is_a_file(cli, tmp_path, stories_checkpoint, instruction_data):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, instruction_data, target)), "is a file")
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- parts that must fit

def test_parts_that_do_not_fit_are_refused_before_any_work(cli, tmp_path, stories_checkpoint, instruction_data,
                                                           shared_data):
    # data prepared with another tokenizer (the 32,000-piece LLaMA one) for this 512-token model
    other_data = tmp_path / "data-32k"
    shutil.copytree(instruction_data, other_data)
    meta = json.loads((other_data / "metadata.json").read_text())
    meta["tokenizer"]["vocab_size"] = 32000
    (other_data / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, other_data, out)), "prepared with a tokenizer of 32000")
    # token ids outside the vocabulary, whatever the metadata says
    bad_ids = tmp_path / "data-ids"
    shutil.copytree(instruction_data, bad_ids)
    examples = torch.load(bad_ids / "train.pt", weights_only=True)
    examples[3]["input_ids"][1] = 600
    torch.save(examples, bad_ids / "train.pt")
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, bad_ids, out)), "token id 600")
    # a checkpoint whose tokenizer is another model's
    mixed = tmp_path / "mixed"
    shutil.copytree(stories_checkpoint, mixed)
    shutil.copyfile(shared_data / "tokenizers" / "llama" / "tokenizer.model", mixed / "tokenizer.model")
    assert_one_error_line(cli(*finetune_args(mixed, instruction_data, out)), "different checkpoints")
    # a model config with a wrong-typed field
    typed = tmp_path / "typed"
    shutil.copytree(stories_checkpoint, typed)
    config = json.loads((typed / "model_config.json").read_text())
    config["n_layer"] = "5"
    (typed / "model_config.json").write_text(json.dumps(config))
    assert_one_error_line(cli(*finetune_args(typed, instruction_data, out)), "n_layer must be int")
    # full fine-tuning must be able to write a complete final/ (tokenizer included): refused at start, not at the end
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(stories_checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    full = list(finetune_args(no_tokenizer, instruction_data, out))
    full[0] = "finetune/full.py"
    assert_one_error_line(cli(*full), "has no tokenizer.model")
    assert not any((out / name).exists() for name in ("last.ckpt", "final", "summary.json"))


# ---------------------------------------------------------------------------------------------- guarded loads

def test_broken_checkpoints_and_final_folders_are_one_line(cli, tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "run"
    done = cli(*finetune_args(stories_checkpoint, instruction_data, out, "--lora.r", 4))
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = out / "last.ckpt"
    good = ckpt.read_bytes()
    # another rank: the run was r=4, this one asks for r=8; named as the option (issue 26), not as tensor shapes
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, instruction_data, out, "--lora.r", 8,
                                             "--resume", "true")), "other settings", "lora.r: 4 -> 8")
    # a run without its hparams.json (an older version's) is still caught by the checkpoint's shapes
    recorded = (out / "hparams.json").read_bytes()
    (out / "hparams.json").unlink()
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, instruction_data, out, "--lora.r", 8,
                                             "--resume", "true")), "does not fit", "shape mismatches")
    (out / "hparams.json").write_bytes(recorded)
    ckpt.write_bytes(good[: len(good) // 2])  # truncated
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, instruction_data, out, "--lora.r", 4,
                                             "--resume", "true")), "cannot read", "last.ckpt")
    ckpt.write_bytes(b"not a checkpoint at all")
    assert_one_error_line(cli(*finetune_args(stories_checkpoint, instruction_data, out, "--lora.r", 4,
                                             "--resume", "true")), "cannot read")
    final = out / "final"
    generate = ("generate/lora.py", "--checkpoint_dir", stories_checkpoint, "--adapter_dir", final,
                "--max_new_tokens", 2, "--device", "cpu")
    weights = (final / "adapter.safetensors").read_bytes()
    (final / "adapter.safetensors").write_bytes(weights[: len(weights) // 2])
    assert_one_error_line(cli(*generate), "adapter.safetensors")
    (final / "adapter.safetensors").write_bytes(weights)
    (final / "adapter_config.json").write_text('{"method": "lora", "settings": ')
    assert_one_error_line(cli(*generate), "adapter_config.json", "not valid JSON")


def test_generation_refuses_another_methods_folder_and_bad_options(cli, tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "run"
    assert cli(*finetune_args(stories_checkpoint, instruction_data, out)).returncode == 0
    base = ("--checkpoint_dir", stories_checkpoint, "--adapter_dir", out / "final", "--max_new_tokens", 2,
            "--device", "cpu")
    assert_one_error_line(cli("generate/adapter_v2.py", *base), "holds a lora fine-tune, not adapter_v2",
                          "generate/lora.py")
    answered = cli("generate/finetuned.py", *base, "--temperature", 0, "--instruction", "Name a bird.")
    assert answered.returncode == 0 and "loaded lora" in answered.stderr, answered.stderr[-2000:]
    assert_one_error_line(cli("generate/lora.py", *base, "--precision", "fp8"), "--precision")
    assert_one_error_line(cli("generate/lora.py", *base[:-2], "--device", "tpu9"), "--device")


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("option, fragment", [
    (("--fabric.precision", "32"), "fabric.precision"),
    (("--fabric.accelerator", "cuda"), "no CUDA device"),
    (("--fabric.devices", "0"), "fabric.devices"),
    (("--data.max_seq_length", "0"), "data.max_seq_length"),
    (("--quantize", "nf4"), "did you mean bnb.nf4"),
    (("--train.learnin_rate", "1"), "did you mean --train.learning_rate"),
    (("--train.max_steps", "many"), "--train.max_steps many"),
])
def test_bad_options_are_one_line(cli, tmp_path, stories_checkpoint, instruction_data, option, fragment):
    args = [a for a in finetune_args(stories_checkpoint, instruction_data, tmp_path / "out") if a != "cpu"]
    args.remove("--fabric.accelerator")
    assert_one_error_line(cli(*args, *option), fragment)
    assert not (tmp_path / "out" / "last.ckpt").exists()


# ---------------------------------------------------------------------------------------------- faults while saving

def test_a_full_disk_at_checkpoint_time_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, stories_checkpoint, instruction_data, monkeypatch, capsys):
    from lightning.fabric import Fabric

    original = Fabric.save
    calls = {"n": 0}

    def save(self, path, state, filter=None):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return original(self, path, state, filter=filter)

    monkeypatch.setattr(Fabric, "save", save)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run, tmp_path, stories_checkpoint, instruction_data, steps=4, save_interval=1, method="lora")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write the checkpoint") and "No space left on device" in err[-1]
    assert torch.load(tmp_path / training.CHECKPOINT_NAME, weights_only=True)["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_second_signal_during_the_final_save_says_what_is_on_disk(tmp_path, stories_checkpoint, instruction_data,
                                                                     monkeypatch, capsys):
    from lit_adapter.train import trainer

    original = trainer.save_resumable  # what Trainer.save calls
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the end-of-run save, after the step-2 one
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_resumable", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, stories_checkpoint, instruction_data, steps=3, save_interval=2, method="lora")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "stopped again during shutdown" in err and "checkpoint of step 2" in err and "final/ was not written" in err
    assert torch.load(tmp_path / training.CHECKPOINT_NAME, weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------------------------- what the user sees

def test_a_two_step_int8_run_prints_a_short_log(tmp_path, stories_checkpoint, instruction_data):
    proc = subprocess_cli(*finetune_args(stories_checkpoint, instruction_data, tmp_path / "out", "--quantize",
                                         "bnb.int8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 40, "\n".join(lines)
    assert sum("inputs will be cast" in line for line in lines) == 0
    assert sum("int8 layers compute in float16" in line for line in lines) == 1
    assert not any("kernels-community" in line for line in lines)
    assert any("before training (step 0)" in line for line in lines)


def test_the_summary_says_when_validation_was_measured(tmp_path, stories_checkpoint, instruction_data, capsys):
    from lit_adapter.tracking.results import RunResult, describe_validation

    stopped = RunResult(method="lora", status="interrupted", steps=7, trainable_params=1, total_params=2,
                        initial_val_loss=3.7466, final_val_loss=3.7466, final_val_step=0)
    assert describe_validation(stopped) == "3.7466 before training (step 0), none after training (stopped at step 7)"
    midway = RunResult(method="lora", status="interrupted", steps=7, trainable_params=1, total_params=2,
                       initial_val_loss=3.7, final_val_loss=3.1, final_val_step=5)
    assert describe_validation(midway) == "3.7000 before training (step 0), 3.1000 at step 5 (the last validation)"
    result = run(tmp_path, stories_checkpoint, instruction_data, steps=2, method="lora")
    assert result.final_val_step == 2
    assert "at step 2 (the last step)" in capsys.readouterr().out


def test_user_error_is_not_swallowed_for_programming_errors():
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)
    with pytest.raises(SystemExit):
        run_cli(lambda: (_ for _ in ()).throw(UserError("x")))


def test_an_offline_wandb_run_logs_plainly_and_says_how_to_upload(cli, tmp_path, stories_checkpoint,
                                                                    instruction_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    proc = cli(*finetune_args(stories_checkpoint, instruction_data, tmp_path / "out", "--logger.logger_name", "wandb"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "\x1b[" not in output and "anonymous" not in output
    sync = [line for line in output.splitlines() if line.startswith("wandb: offline run in")]
    assert len(sync) == 1 and "wandb sync " in sync[0]
    assert Path(sync[0].rsplit("wandb sync ", 1)[1]).is_dir()
