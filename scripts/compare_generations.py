"""Answer the same instructions with a base checkpoint and several fine-tuned ones; write a side-by-side table.

Every model gets the instruction inside the Alpaca template the fine-tuning runs were trained with
(``lit_adapter.data.prompts.generate_prompt``), the base included, so the columns differ only in the weights. A run
trained on chat data (``scripts/prepare_chat.py``: its ``adapter_config.json`` records the chat template) gets the
instruction as a user turn of that template instead, and its answer ends at the template's end of turn.
"""

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import UserError, run_cli  # noqa: E402


def load_instructions(path: Path, limit: Optional[int]) -> List[Dict[str, str]]:
    """``[{"instruction", "input"}]`` from a JSON array or JSON lines: Alpaca (instruction/input), Dolly
    (instruction/context) or Self-Instruct seed tasks (instruction/instances[0].input)."""
    import json

    if not path.is_file():
        raise UserError(f"instructions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is neither a JSON array nor JSON lines: {err}") from None
    records = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not str(row.get("instruction", "")).strip():
            raise UserError(f"{path}, record {i}: needs a non-empty 'instruction'")
        extra = row.get("input", row.get("context"))
        if extra is None and row.get("instances"):
            extra = row["instances"][0].get("input", "")
        records.append({"instruction": row["instruction"], "input": extra or ""})
    return records[:limit] if limit is not None else records


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def markdown_table(names: List[str], records: List[Dict[str, str]], answers: Dict[str, List[str]]) -> str:
    lines = ["| # | instruction | " + " | ".join(_cell(n) for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i, record in enumerate(records):
        instruction = record["instruction"] + (f"<br>*input:* {record['input']}" if record["input"].strip() else "")
        row = [str(i + 1), _cell(instruction)] + [_cell(answers[n][i]) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def answer_all(checkpoint_dir: Path, adapter_dir: Optional[Path], records, max_new_tokens, temperature, top_k,
               quantize, precision, device, seed) -> Dict:
    import torch

    from lit_adapter.data.instructions import InstructionRecord
    from lit_adapter.evaluation import describe_model, load_model
    from lit_adapter.generation.decode import generate_tokens
    from lit_adapter.data.chat import encode_chat, end_of_turn_id, recorded_template
    from lit_adapter.data.prompts import generate_prompt

    config, model, tokenizer, spec, dev = load_model(checkpoint_dir, adapter_dir, quantize, precision, device)
    # a run trained on chat data answers as it was trained: the instruction (and input) as its template's user turn
    chat = recorded_template(adapter_dir)
    marker = chat.end_of_turn() if chat is not None else ""
    end_of_turn = end_of_turn_id(tokenizer, marker) if chat is not None else None
    answers, n_tokens, t0 = [], 0, time.perf_counter()
    for record in records:
        torch.manual_seed(seed)  # each answer samples the same way whatever came before it
        if chat is not None:
            text = record["instruction"] + (f"\n\n{record['input']}" if record["input"].strip() else "")
            ids = torch.tensor(encode_chat(tokenizer, chat.prompt(text))[0], device=dev)
        else:
            prompt = generate_prompt(InstructionRecord(instruction=record["instruction"], input=record["input"]))
            ids = tokenizer.encode(prompt, bos=True, device=dev)
        if ids.numel() >= config.block_size:
            answers.append(f"(prompt of {ids.numel()} tokens does not fit the context of {config.block_size})")
            continue
        new = [t.item() for t in generate_tokens(model, ids, max_new_tokens, temperature, top_k, tokenizer.eos_id)]
        n_tokens += len(new)
        if end_of_turn in new:
            new = new[: new.index(end_of_turn)]
        answer = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        answers.append((answer.split(marker)[0] if marker else answer).strip())
    seconds = time.perf_counter() - t0
    run = Path(adapter_dir).resolve().parent.name if adapter_dir is not None else ""  # out/<run>/final
    label = "base" if adapter_dir is None else spec.describe() + (f" ({run})" if run not in ("", spec.method) else "")
    return {**describe_model(checkpoint_dir, adapter_dir, spec), "name": label, "answers": answers,
            "generated_tokens": n_tokens, "seconds": seconds, "tokens_per_second": n_tokens / max(seconds, 1e-9)}


def main(
    checkpoint_dir: Path,
    adapter_dirs: Optional[str] = None,
    instructions: Optional[Path] = None,
    limit: Optional[int] = 10,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 1234,
    out: Path = Path("out/generations.md"),
    data_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
) -> Dict:
    """Write out (Markdown: one row per instruction, one column per model) and the same stem with .json.

    Args:
        checkpoint_dir: The base checkpoint the runs fine-tuned.
        adapter_dirs: Comma-separated final/ folders of fine-tuning runs (e.g. out/adapter/final,out/lora/final).
        instructions: JSON array or JSON lines with instruction (and input or context); default: the 80 held-out
            Dolly records, dolly/global_test.json under --data_dir.
        limit: Answer only the first N instructions.
        max_new_tokens: Tokens generated per answer at most (stops at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding (the same answer every run).
        top_k: Sample only among the k most likely tokens.
        seed: Random seed for sampling, reset before every answer.
        out: The Markdown file to write; the JSON goes beside it.
        data_dir: Folder holding dolly/global_test.json (default: ../shared/data beside the checkout).
        quantize: Load the frozen base in 8 or 4 bits with bitsandbytes.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
    """
    from lit_adapter.evaluation import DEFAULT_DATA_DIR, run_info, split_names, write_json

    if instructions is None:
        instructions = Path(data_dir or DEFAULT_DATA_DIR) / "dolly" / "global_test.json"
        if not instructions.is_file():
            raise UserError(f"default instructions {instructions} not found; pass --instructions FILE or --data_dir")
    records = load_instructions(Path(instructions), limit)
    adapters = [Path(a) for a in split_names(adapter_dirs, "adapter dirs")] if adapter_dirs else []
    for a in adapters:
        if not a.is_dir():
            raise UserError(f"adapter directory not found: {a}")

    models = []
    for adapter_dir in [None, *adapters]:
        result = answer_all(checkpoint_dir, adapter_dir, records, max_new_tokens, temperature, top_k, quantize,
                            precision, device, seed)
        print(f"{result['name']}: {len(records)} answers, {result['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
        models.append(result)
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):  # two runs of the same method: tell the columns apart by folder
        for m in models[1:]:
            m["name"] = f"{m['name']} [{m['adapter_dir']}]"
        names = [m["name"] for m in models]
    table = markdown_table(names, records, {m["name"]: m["answers"] for m in models})
    settings = (f"Base `{checkpoint_dir}`; {len(records)} instructions from `{instructions}`; max_new_tokens "
                f"{max_new_tokens}, temperature {temperature}" + (f", top_k {top_k}" if top_k else "") + ".\n\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Generations side by side\n\n" + settings + table)
    from lit_adapter.evaluation import resolve_device

    report = {"instructions": records, "source": str(instructions), "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_k": top_k, "seed": seed, "models": models,
              "run": run_info(resolve_device(device))}
    write_json(out.with_suffix(".json"), report)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
