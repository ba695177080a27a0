"""The main job on an embedded default, offline: convert -> prepare -> fine-tune -> generate, in about a minute on CPU.

It converts karpathy's real pretrained TinyStories model stories260K (``../shared/data/checkpoints``) with its own
512-piece vocabulary, prepares the built-in synthetic instruction set (simple tasks such as reversing a word or adding
two numbers), fine-tunes it with LLaMA-Adapter v2 and answers a held-out instruction before and after.
"""

from pathlib import Path
from typing import Literal

from lit_adapter.errors import UserError, run_cli

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# tuned for this 60-step demo on a 260K-parameter model (the finetune commands keep their own defaults)
DEMO_LEARNING_RATES = {"adapter": 2e-2, "adapter_v2": 2e-2, "lora": 3e-3}


def main(
    shared_data: Path = DEFAULT_SHARED,
    out_dir: Path = Path("out/quickstart"),
    method: Literal["adapter", "adapter_v2", "lora"] = "adapter_v2",
    max_steps: int = 60,
    records: int = 2000,
    seed: int = 1337,
    overwrite: bool = True,
) -> None:
    """Convert stories260K, prepare the synthetic instructions, fine-tune and generate.

    Args:
        shared_data: The offline data folder with checkpoints/stories260K/{stories260K.bin,tok512.bin}.
        out_dir: Where the converted checkpoint, the prepared data and the run go.
        method: Which PEFT method to fine-tune with.
        max_steps: Optimizer steps of the fine-tuning run (batch 16).
        records: How many synthetic instruction records to generate.
        seed: Seed of the data split and of training.
        overwrite: Replace the run an earlier quickstart left in ``out_dir/<method>`` (the demo is made to be run
            again, as LitGPT's recipes are); ``--overwrite false`` refuses instead, keeping it.
    """
    import json

    import torch

    from lit_adapter.model.attention import AttentionConfig
    from lit_adapter.convert import convert_llama2c_checkpoint
    from lit_adapter.data.instructions import InstructionRecord, load_prepared, prepare
    from lit_adapter.generation.decode import generate
    from lit_adapter.tuners.registry import MethodSpec, load_finetuned
    from lit_adapter.data.prompts import generate_prompt
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune

    source = Path(shared_data) / "checkpoints" / "stories260K"
    if not (source / "stories260K.bin").is_file():
        raise UserError(
            f"stories260K not found in {source}; pass --shared_data pointing at the offline data folder "
            "(or download stories260K.bin and tok512.bin from karpathy/tinyllamas on the HF hub)"
        )
    out_dir = Path(out_dir)
    checkpoint_dir, data_dir, run_dir = out_dir / "stories260K", out_dir / "data", out_dir / method
    print(f"1/4 converting {source / 'stories260K.bin'} -> {checkpoint_dir}")
    convert_llama2c_checkpoint(source / "stories260K.bin", checkpoint_dir, tokenizer_path=source / "tok512.bin")

    print(f"2/4 preparing {records} synthetic instruction records -> {data_dir}")
    prepare(data_dir, checkpoint_dir, source="synthetic", max_records=records, val_size=200, seed=seed,
            max_seq_length=256, mask_inputs=True, progress=False)

    tokenizer = Tokenizer(checkpoint_dir)
    _, val, _ = load_prepared(data_dir)
    question = InstructionRecord(instruction="Add 12 and 7.")

    def answer(adapter_dir):
        _, model, _ = load_finetuned(checkpoint_dir, adapter_dir, torch.device("cpu"), torch.float32)
        prompt = tokenizer.encode(generate_prompt(question))
        out = generate(model, prompt, max_new_tokens=12, temperature=0.0, eos_id=tokenizer.eos_id)
        return tokenizer.decode(out[len(prompt):].tolist()).strip()

    print(f"3/4 fine-tuning with {method} for {max_steps} steps")
    spec = MethodSpec(method, attention=AttentionConfig())
    result = finetune(
        spec,
        checkpoint_dir=checkpoint_dir,
        model_name=None,
        out_dir=run_dir,
        data=DataArgs(data_dir=data_dir),
        train=TrainArgs(global_batch_size=16, micro_batch_size=8, max_steps=max_steps, warmup_steps=5,
                        learning_rate=DEMO_LEARNING_RATES[method], seed=seed, log_interval=5),
        eval=EvalArgs(interval=max_steps, max_batches=10),
        fabric_args=FabricArgs(accelerator="cpu", precision="32-true"),
        logger=LoggerArgs(),
        overwrite=overwrite,
    )

    print("4/4 generating (greedy) for a new instruction: " + json.dumps(question.instruction))
    print(f"  base model:       {answer(None)!r}")
    print(f"  after {method}: {answer(run_dir / 'final')!r}")
    print(f"validation loss {result.initial_val_loss:.3f} -> {result.final_val_loss:.3f}; outputs in {run_dir}")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
