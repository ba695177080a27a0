"""What a run leaves behind and how it is read back: best/ beside final/, and the base's quantization recorded in
adapter_config.json and reused by generation and evaluation."""

import json

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file

from lit_adapter.tuners.registry import load_finetuned
from lit_adapter.tuners.lora import LoRAConfig
from test_training import run


def test_best_holds_the_lowest_validation_loss_after_step_0(tmp_path, stories_checkpoint, instruction_data):
    result = run(tmp_path, stories_checkpoint, instruction_data, steps=6, method="lora",
                 settings=LoRAConfig(r=4, alpha=8, dropout=0.0), learning_rate=0.05)
    trained = [(step, loss) for step, loss in result.val_losses if step > 0]
    best_step, best_loss = min(trained, key=lambda item: item[1])
    assert (result.best_val_step, result.best_val_loss) == (best_step, best_loss)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_val_step"] == best_step
    best = load_file(str(tmp_path / "best" / "adapter.safetensors"))
    final = load_file(str(tmp_path / "final" / "adapter.safetensors"))
    assert best.keys() == final.keys()
    if best_step == result.steps:
        assert all(torch.equal(best[k], final[k]) for k in best)
    # both load the same way, for generation and evaluation
    for folder in ("best", "final"):
        _, model, spec = load_finetuned(stories_checkpoint, tmp_path / folder, torch.device("cpu"), torch.float32)
        assert spec.method == "lora"
    assert not (tmp_path / "best.tmp").exists() and not (tmp_path / "best.old").exists()


def test_best_is_tracked_at_every_validation(tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    """With validations at steps 2, 4 and 6, best/ follows the lowest one, not the last."""
    import lit_adapter.train.trainer as trainer
    import lit_adapter.train.run as training

    losses = iter([5.0, 3.0, 4.0, 4.5])  # steps 0, 2, 4 and the final one at 6

    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: next(losses))  # what Trainer.validate calls
    saved = []
    original = training.methods.save_adapter_folder
    monkeypatch.setattr(training.methods, "save_adapter_folder",
                        lambda model, spec, config, ckpt, out, **kw: saved.append(out.name) or original(
                            model, spec, config, ckpt, out, **kw))
    from lit_adapter.tuners.registry import MethodSpec
    from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune

    result = finetune(MethodSpec("lora", LoRAConfig(r=2, alpha=4, dropout=0.0)), checkpoint_dir=stories_checkpoint,
                      model_name=None, out_dir=tmp_path, data=DataArgs(data_dir=instruction_data),
                      train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=6, warmup_steps=1),
                      eval=EvalArgs(interval=2, max_batches=1), fabric_args=FabricArgs(accelerator="cpu"),
                      logger=LoggerArgs())
    assert (result.best_val_step, result.best_val_loss) == (2, 3.0)
    assert saved == ["best", "final"]  # step 2 improved; steps 4 and 6 did not


def test_a_quantized_runs_reload_uses_its_quantization_unless_told_otherwise(tmp_path, stories_checkpoint,
                                                                          instruction_data, capsys):
    run(tmp_path, stories_checkpoint, instruction_data, steps=2, method="lora", quantize="bnb.int8",
        settings=LoRAConfig(r=2, alpha=4, dropout=0.0))
    meta = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert meta["quantize"] == "bnb.int8"
    capsys.readouterr()

    def kinds(quantize):
        _, model, spec = load_finetuned(stories_checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32,
                                        quantize)
        return {type(m) for m in model.modules()}, spec.quantize, capsys.readouterr().err

    found, mode, note = kinds(None)
    assert bnb.nn.Linear8bitLt in found and mode == "bnb.int8" and "as " in note and "was trained" in note
    found, mode, note = kinds("none")
    assert bnb.nn.Linear8bitLt not in found and mode is None and "in full precision as asked" in note
    found, mode, note = kinds("bnb.int8")
    assert mode == "bnb.int8" and note == ""
