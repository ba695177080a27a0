"""Write a fine-tuned run's LoRA, IA³ or LLaMA-Adapter v1 tensors as an HF PEFT adapter folder."""

from pathlib import Path
from typing import Optional

from lit_adapter.errors import run_cli
from lit_adapter.export import export_peft


def main(
    adapter_dir: Path,
    output_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors in PEFT's format, which
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), <output_dir>) loads.

    On GPT-2 the targets are HF's c_attn / c_proj / c_fc (our q/k/v LoRA stacked exactly onto the fused c_attn).
    LoRA becomes a LoraConfig adapter, IA³ an IA3Config one and LLaMA-Adapter v1 an AdaptionPromptConfig one (only
    when every layer's heads share one gate: PEFT has one gate per layer). Methods PEFT cannot represent (Adapter
    v2, BitFit, Houlsby, Pfeiffer, full fine-tuning) and sparse attention are refused with one line. The base
    itself is written by scripts/convert_to_hf.py. See docs/export.md.

    Args:
        adapter_dir: A fine-tuned run's final/ (or best/) folder.
        output_dir: The PEFT adapter folder to write; an existing non-empty folder is refused unless
            --overwrite true.
        checkpoint_dir: The converted base checkpoint, checked against the base the run recorded; by default the
            recorded one (its weights are not needed).
        base_model_name_or_path: What adapter_config.json names as the base: the hub id or folder of the HF base
            (written by scripts/convert_to_hf.py); AutoPeftModelForCausalLM loads it from there.
        overwrite: Replace output_dir when it exists and is not empty.
    """
    files = export_peft(adapter_dir, output_dir, checkpoint_dir=checkpoint_dir,
                        base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)
    print(f"wrote {output_dir}: {', '.join(files)}")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
