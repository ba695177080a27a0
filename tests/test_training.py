"""The training engine on the real pretrained stories260K with its own tokenizer and prepared instruction data."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.train import losses
from lit_adapter.train import run as training
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.model.attention import AttentionConfig
from lit_adapter.errors import UserError
from lit_adapter.tuners.lora import LoRAConfig
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.train.run import (
    DataArgs, EvalArgs, FabricArgs, LoggerArgs, StepBatchSampler, TrainArgs, finetune, lr_at, validate_args,
)

REPO = Path(__file__).resolve().parents[1]


def run(out_dir, checkpoint, data_dir, method="adapter_v2", steps=6, attention=None, quantize=None, settings=None,
        resume=False, **train_overrides):
    settings = settings or (AdapterConfig(start_layer=0) if method.startswith("adapter") else None)
    spec = MethodSpec(method, settings=settings, attention=attention or AttentionConfig(), quantize=quantize)
    train = TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=steps, warmup_steps=2, learning_rate=1e-2,
                      log_interval=1, seed=7)
    for key, value in train_overrides.items():
        setattr(train, key, value)
    return finetune(
        spec, checkpoint_dir=checkpoint, model_name=None, out_dir=out_dir, data=DataArgs(data_dir=data_dir),
        train=train, eval=EvalArgs(interval=1000, max_batches=3), fabric_args=FabricArgs(accelerator="cpu"),
        logger=LoggerArgs(), resume=resume,
    )


def test_warmup_is_counted_in_optimizer_steps_then_cosine():
    train = TrainArgs(learning_rate=1.0, warmup_steps=4, min_learning_rate=0.1)
    lrs = [lr_at(s, 20, train) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(20, 20, train) == pytest.approx(0.1)


def test_step_sampler_visits_each_example_once_per_epoch_and_resumes_mid_stream():
    full = list(StepBatchSampler(40, 4, accum=2, world_size=1, rank=0, seed=5, start_step=0, total_steps=10))
    first_epoch = [i for batch in full[:10] for i in batch]
    assert sorted(first_epoch) == list(range(40))
    assert full[:10] != full[10:]  # a new permutation in the next epoch
    resumed = list(StepBatchSampler(40, 4, accum=2, world_size=1, rank=0, seed=5, start_step=3, total_steps=10))
    assert resumed == full[6:]
    # two ranks split each step's micro-batches without overlap
    r0 = list(StepBatchSampler(40, 4, accum=1, world_size=2, rank=0, seed=5, start_step=0, total_steps=5))
    r1 = list(StepBatchSampler(40, 4, accum=1, world_size=2, rank=1, seed=5, start_step=0, total_steps=5))
    assert sorted(i for b in r0 + r1 for i in b) == list(range(40))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(global_batch_size=6), "not a multiple"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(beta2=1.0), "beta"),
    ],
)
def test_impossible_hyper_parameters_are_user_errors(change, message):
    train = TrainArgs(**change)
    with pytest.raises(UserError, match=message):
        validate_args(train, EvalArgs(), FabricArgs())


def test_seeded_runs_are_reproducible(tmp_path, stories_checkpoint, instruction_data):
    a = run(tmp_path / "a", stories_checkpoint, instruction_data)
    b = run(tmp_path / "b", stories_checkpoint, instruction_data)
    assert a.train_losses == b.train_losses
    assert a.final_val_loss == b.final_val_loss
    ta, tb = load_file(tmp_path / "a/final/adapter.safetensors"), load_file(tmp_path / "b/final/adapter.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# LoRA with dropout (the RNG state must be restored too); full fine-tuning with bitsandbytes' 8-bit AdamW, whose
# uint8 moments and absmax statistics (tensors of 4096+ values: the embedding, the MLPs) must round-trip too
@pytest.mark.parametrize("method, settings, optimizer", [
    ("lora", LoRAConfig(r=4, alpha=8, dropout=0.1), "adamw"),
    ("full", None, "adamw8bit"),
])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, stories_checkpoint, instruction_data,
                                                                    monkeypatch, method, settings, optimizer):
    whole = run(tmp_path / "whole", stories_checkpoint, instruction_data, method=method, steps=8, settings=settings,
                optimizer=optimizer)

    original = training.lr_at
    fired = []

    def interrupt_after_step_4(step, total, train):
        # the scheduler asks for step 4's rate right after optimizer step 4, once per parameter group (LoRA+ has 2)
        if step == 4 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, total, train)

    monkeypatch.setattr(training, "lr_at", interrupt_after_step_4)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "split", stories_checkpoint, instruction_data, method=method, steps=8, settings=settings,
            optimizer=optimizer)
    assert exit_info.value.code == 130
    assert (tmp_path / "split" / training.CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "split" / "final").exists()
    monkeypatch.setattr(training, "lr_at", original)

    resumed = run(tmp_path / "split", stories_checkpoint, instruction_data, method=method, steps=8,
                  settings=settings, resume=True, optimizer=optimizer)
    assert [s for s, _ in resumed.train_losses] == list(range(1, 9))
    assert resumed.train_losses == whole.train_losses
    assert resumed.final_val_loss == whole.final_val_loss
    weights = "lit_model.safetensors" if method == "full" else "adapter.safetensors"
    tw = load_file(tmp_path / "whole/final" / weights)
    ts = load_file(tmp_path / "split/final" / weights)
    assert tw.keys() == ts.keys() and all(torch.equal(tw[k], ts[k]) for k in tw)
    if optimizer == "adamw8bit":  # 8-bit moments really were used (and saved)
        saved = torch.load(tmp_path / "split" / training.CHECKPOINT_NAME, weights_only=True)
        # bitsandbytes nests its tensors in the state dict (``__bnb_optimizer_quant_state__``)
        def tensors(obj):
            if torch.is_tensor(obj):
                yield obj
            elif isinstance(obj, dict):
                for value in obj.values():
                    yield from tensors(value)

        dtypes = {t.dtype for t in tensors(saved["optimizer"]["state"])}
        assert torch.uint8 in dtypes


@pytest.mark.parametrize(
    "method, attention",
    [("adapter", "dense"), ("adapter", "local"), ("adapter_v2", "dense"), ("adapter_v2", "shifted"), ("lora", "dense")],
)
def test_each_method_beats_the_frozen_model_on_validation(tmp_path, stories_checkpoint, instruction_data, method,
                                                          attention):
    attn = AttentionConfig(pattern=attention, window=32)
    settings = LoRAConfig(r=8, alpha=16, dropout=0.0, mlp=True) if method == "lora" else None
    lr = {"adapter": 4e-2, "adapter_v2": 2e-2, "lora": 5e-3}[method]
    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=16, attention=attn,
                 settings=settings, learning_rate=lr)
    assert result.status == "completed"
    assert result.final_val_loss < result.initial_val_loss - 0.25, result
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["method"] == method and saved["attention"]["pattern"] == attention
    # only the trainable tensors are saved: kilobytes, not the base model
    assert (tmp_path / "final" / "adapter.safetensors").stat().st_size < 200_000


@pytest.mark.parametrize("method, quantize", [("lora", "bnb.nf4"), ("adapter", "bnb.int8")])
def test_quantized_base_trains_on_cpu(tmp_path, stories_checkpoint, instruction_data, method, quantize):
    import bitsandbytes as bnb

    settings = LoRAConfig(r=4, alpha=8, dropout=0.0) if method == "lora" else None
    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=8, quantize=quantize,
                 settings=settings, learning_rate=2e-2 if method == "adapter" else 5e-3)
    assert result.final_val_loss < result.initial_val_loss
    # the run really used bitsandbytes layers: rebuild as the engine does and look
    from lit_adapter.tuners.registry import prepare_model

    spec = MethodSpec(method, settings=settings or AdapterConfig(start_layer=0), quantize=quantize)
    from lit_adapter.model.config import Config

    model = prepare_model(spec, Config.from_checkpoint_dir(stories_checkpoint), stories_checkpoint,
                          torch.device("cpu"), torch.float32)
    kinds = {type(m) for m in model.modules()}
    assert (bnb.nn.Linear4bit if quantize == "bnb.nf4" else bnb.nn.Linear8bitLt) in kinds
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "adapter" not in n
               and "gating" not in n)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, stories_checkpoint,
                                                                          instruction_data, monkeypatch):
    calls = {"n": 0}
    original = losses.CrossEntropy.apply  # every training loss's cross-entropy (head on the target rows or not)

    def poisoned(rows, targets, ignore_index=-100, mean=True):
        loss = original(rows, targets, ignore_index, mean)
        if rows.requires_grad:  # count training micro-batches only (2 per step), not validation
            calls["n"] += 1
            if calls["n"] > 8:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(losses.CrossEntropy, "apply", poisoned)
    with pytest.raises(training.LossNotFinite, match=r"step 5.*last good checkpoint .* \(step 2.*step-4 checkpoint"):
        run(tmp_path, stories_checkpoint, instruction_data, steps=8, save_interval=2)
    # the step-4 checkpoint's next step diverged, so it is set aside; the step-2 one (whose next step was fine) is
    # last.ckpt again
    state = torch.load(tmp_path / training.CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert torch.load(tmp_path / (training.CHECKPOINT_NAME + ".diverged"), weights_only=True)["step"] == 4


def test_missing_data_and_empty_split_are_clear_errors(tmp_path, stories_checkpoint, instruction_data):
    with pytest.raises(UserError, match="train.pt|not found|missing"):
        run(tmp_path / "a", stories_checkpoint, tmp_path / "nowhere")
    with pytest.raises(UserError, match="fewer than one global batch"):
        run(tmp_path / "b", stories_checkpoint, instruction_data, global_batch_size=512, micro_batch_size=4)


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path, stories_checkpoint, instruction_data):
    run(tmp_path, stories_checkpoint, instruction_data, method="adapter", steps=2)
    # the settings are compared first (naming the one that changed); without hparams.json, the tensors are
    with pytest.raises(UserError, match=r"other settings \(method: \"adapter\" -> \"lora\"\)"):
        run(tmp_path, stories_checkpoint, instruction_data, method="lora", steps=4, resume=True)
    (tmp_path / "hparams.json").unlink()
    with pytest.raises(UserError, match="does not fit"):
        run(tmp_path, stories_checkpoint, instruction_data, method="lora", steps=4, resume=True)


def test_finetune_and_generate_scripts_end_to_end(tmp_path, stories_checkpoint, instruction_data):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"checkpoint_dir: {stories_checkpoint}\nout_dir: {tmp_path / 'out'}\n"
        f"data: {{data_dir: {instruction_data}}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "train: {global_batch_size: 8, micro_batch_size: 4, max_steps: 4, warmup_steps: 1, learning_rate: 0.005}\n"
        "eval: {interval: 2, max_batches: 2}\nfabric: {accelerator: cpu}\n"
    )
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "lora.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable parameters:" in proc.stdout and "before training (step 0)" in proc.stdout
    out = tmp_path / "out"
    for name in ("final/adapter.safetensors", "final/adapter_config.json", "summary.json", "hparams.json",
                 training.CHECKPOINT_NAME):
        assert (out / name).is_file(), name
    metrics_files = list(out.glob("logs/version_*/metrics.csv"))
    assert len(metrics_files) == 1
    rows = list(csv.DictReader(metrics_files[0].open()))
    train_rows = [r for r in rows if r.get("train_loss")]
    assert [int(float(r["step"])) for r in train_rows] == [1, 2, 3, 4]
    assert all(float(r["tokens_per_s"]) > 0 for r in train_rows)
    assert float(train_rows[0]["learning_rate"]) == pytest.approx(0.005)  # warmup of 1 step, then cosine to 0
    val_steps = sorted(int(float(r["step"])) for r in rows if r.get("val_loss"))
    assert val_steps == [0, 2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4

    gen = subprocess.run(
        [sys.executable, str(REPO / "generate" / "lora.py"), "--checkpoint_dir", str(stories_checkpoint),
         "--adapter_dir", str(out / "final"), "--instruction", "Add 2 and 3.", "--temperature", "0",
         "--max_new_tokens", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "tokens/s" in gen.stderr and gen.stdout.strip()


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, stories_checkpoint, instruction_data):
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "finetune" / "adapter.py"), "--checkpoint_dir", str(stories_checkpoint),
        "--data.data_dir", str(instruction_data), "--out_dir", str(out), "--adapter.start_layer", "0",
        "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.max_steps", "100000",
        "--eval.interval", "100000", "--eval.max_batches", "1", "--fabric.accelerator", "cpu",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("logs/version_*/metrics.csv")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "resume" in stdout
    state = torch.load(out / training.CHECKPOINT_NAME, weights_only=True)
    assert state["step"] >= 1
    resumed = subprocess.run(
        command[:-12] + ["--train.global_batch_size", "8", "--train.micro_batch_size", "4",
                         "--train.max_steps", str(state["step"] + 2), "--eval.interval", "1000",
                         "--eval.max_batches", "1", "--fabric.accelerator", "cpu", "--resume", "true"],
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / training.CHECKPOINT_NAME} at step {state['step']}" in resumed.stdout


@pytest.mark.parametrize("logger_name", ["tensorboard", "wandb"])
def test_tensorboard_and_offline_wandb_loggers(tmp_path, stories_checkpoint, instruction_data, logger_name,
                                               monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = MethodSpec("adapter", settings=AdapterConfig(start_layer=0))
    result = finetune(
        spec, checkpoint_dir=stories_checkpoint, model_name=None, out_dir=tmp_path, data=DataArgs(data_dir=instruction_data),
        train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=2, warmup_steps=1, learning_rate=1e-2),
        eval=EvalArgs(interval=1, max_batches=1), fabric_args=FabricArgs(accelerator="cpu"),
        logger=LoggerArgs(logger_name=logger_name, run_name="unit"),
    )
    assert result.status == "completed"
    if logger_name == "tensorboard":
        events = list(tmp_path.glob("logs/unit/events.out.tfevents.*"))
        assert events, list(tmp_path.rglob("*"))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        assert {"train_loss", "val_loss", "learning_rate", "tokens_per_s"} <= set(acc.Tags()["scalars"])
        assert "hp_metric" not in acc.Tags()["scalars"]  # no placeholder -1
        assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]
    else:
        runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        assert runs, list(tmp_path.rglob("*"))[:20]


def test_activation_checkpointing_changes_memory_not_the_numbers(tmp_path, stories_checkpoint, instruction_data):
    plain = run(tmp_path / "plain", stories_checkpoint, instruction_data, steps=3)
    checkpointed = run(tmp_path / "ckpt", stories_checkpoint, instruction_data, steps=3, activation_checkpointing=True)
    for (s1, l1), (s2, l2) in zip(plain.train_losses, checkpointed.train_losses):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6)


@pytest.mark.parametrize("loss", ["chunked", "chunked_head"])
def test_chunked_losses_train_like_the_plain_loss(tmp_path, stories_checkpoint, instruction_data, loss):
    # Adapter v2 trains the head's bias and scale: under chunked_head they get their gradient chunk by chunk
    plain = run(tmp_path / "plain", stories_checkpoint, instruction_data, steps=3)
    chunked = run(tmp_path / loss, stories_checkpoint, instruction_data, steps=3, loss=loss)
    for (s1, l1), (s2, l2) in zip(plain.train_losses, chunked.train_losses, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    assert chunked.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-5)


def test_head_chunked_loss_is_refused_with_fsdp():
    with pytest.raises(UserError, match="chunked_head.*fsdp"):
        validate_args(TrainArgs(loss="chunked_head"), EvalArgs(), FabricArgs(strategy="fsdp"))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bfloat16_precisions_train_on_cpu(tmp_path, stories_checkpoint, instruction_data, precision):
    spec = MethodSpec("adapter_v2", settings=AdapterConfig(start_layer=0))
    result = finetune(
        spec, checkpoint_dir=stories_checkpoint, model_name=None, out_dir=tmp_path,
        data=DataArgs(data_dir=instruction_data),
        train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=6, warmup_steps=1, learning_rate=2e-2),
        eval=EvalArgs(interval=100, max_batches=2), fabric_args=FabricArgs(accelerator="cpu", precision=precision),
        logger=LoggerArgs(),
    )
    assert result.final_val_loss < result.initial_val_loss
    saved = load_file(tmp_path / "final" / "adapter.safetensors")
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {t.dtype for t in saved.values()} == {expected}


def test_ddp_on_two_cpu_processes_matches_one_device(tmp_path, stories_checkpoint, instruction_data):
    """Two DDP ranks split every step's micro-batches; losses and the trained tensors match one device."""
    args = ["--checkpoint_dir", str(stories_checkpoint), "--data.data_dir", str(instruction_data),
            "--adapter.start_layer", "0", "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
            "--train.max_steps", "3", "--train.seed", "7", "--eval.max_batches", "2", "--fabric.accelerator", "cpu"]
    for name, extra in (("single", []), ("ddp", ["--fabric.devices", "2", "--fabric.strategy", "ddp"])):
        proc = subprocess.run([sys.executable, str(REPO / "finetune" / "adapter_v2.py"), *args, *extra,
                               "--out_dir", str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    for (s1, l1), (s2, l2) in zip(single["train_losses"], ddp["train_losses"]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    assert single["final_val_loss"] == pytest.approx(ddp["final_val_loss"], rel=1e-5)
    a = load_file(tmp_path / "single/final/adapter.safetensors")
    b = load_file(tmp_path / "ddp/final/adapter.safetensors")
    # The key projection's v2 bias shifts every score of a query by the same q.b, which softmax ignores: its gradient
    # is rounding noise, which Adam scales up to full steps, so only its shape is comparable. Elsewhere the two ranks'
    # other summation order moves tensors by rounding that Adam's normalisation amplifies (seen: 3.4e-5 on 0.018).
    for key in a:
        if not key.endswith("k_proj.adapter_bias"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


def test_head_chunked_loss_runs_the_head_in_the_forward_precision(tmp_path, stories_checkpoint, instruction_data):
    # bf16-mixed: the head runs outside model.forward under chunked_head, so it needs Fabric's autocast to compute
    # the same bf16 logits as the plain loss (in float32 the losses would differ by ~1e-3)
    def losses(loss):
        spec = MethodSpec("adapter_v2", settings=AdapterConfig(start_layer=0))
        result = finetune(
            spec, checkpoint_dir=stories_checkpoint, model_name=None, out_dir=tmp_path / loss,
            data=DataArgs(data_dir=instruction_data),
            train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=2, warmup_steps=1, learning_rate=2e-2,
                            loss=loss),
            eval=EvalArgs(interval=100, max_batches=2),
            fabric_args=FabricArgs(accelerator="cpu", precision="bf16-mixed"), logger=LoggerArgs(),
        )
        # the first step's loss and the validation before training are forward-only: same logits, same numbers
        # (later values drift by Adam's sign-like first update on gradients summed in another order)
        return [result.train_losses[0][1], result.initial_val_loss]

    assert losses("chunked_head") == pytest.approx(losses("cross_entropy"), rel=1e-6)
