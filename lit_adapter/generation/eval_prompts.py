"""The run's ``--eval.prompts``: the trained model's greedy answers at the end of a run, written beside its
outputs (``generations.jsonl``) and handed to the run record (a WandB table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from lit_adapter.errors import UserError

GENERATIONS_FILE = "generations.jsonl"
# objectives whose model is a language model that can answer an instruction (not a classification head)
ANSWERING_OBJECTIVES = ("next_token", "dpo")


def answer_prompts(fabric, model, checkpoint_dir: Path, prompts: Sequence[str], max_new_tokens: int, step: int,
                   out_dir: Path, objective) -> List[Dict[str, Any]]:
    """The trained model's greedy answers to ``prompts`` (instructions, in the training data's template), written to
    ``out_dir/generations.jsonl``: one ``{"step", "prompt", "response"}`` per prompt. Rank 0 decodes; with FSDP
    (sharded weights) and with objectives whose model does not produce text nothing is answered."""
    if not prompts or fabric.global_rank != 0:
        return []
    if objective.name not in ANSWERING_OBJECTIVES:
        fabric.print(f"note: eval.prompts are not answered: a {objective.name} model does not write text")
        return []
    if type(fabric.strategy).__name__.startswith(("FSDP", "ModelParallel")):
        fabric.print("note: eval.prompts are not answered under fsdp (rank 0 holds a shard of the weights); "
                     "answer them with generate/*.py --adapter_dir final/")
        return []
    from lit_adapter.tuners import registry as methods
    from lit_adapter.generation.decode import generate_batch, real_window, room_for
    from lit_adapter.data.prompts import InstructionRecord, generate_prompt
    from lit_adapter.data.tokenizer import Tokenizer

    model = methods.unwrap(model)
    tokenizer = Tokenizer(checkpoint_dir)
    encoded = [tokenizer.encode(generate_prompt(InstructionRecord(instruction=p)), bos=True, device=fabric.device)
               for p in prompts]
    window = real_window(model)
    fits = [i for i, e in enumerate(encoded) if e.numel() < window]
    responses = {i: "" for i in range(len(prompts))}
    model.eval()
    try:
        if fits:
            room = min(room_for(model, encoded[i].numel()) for i in fits)
            if room < max_new_tokens:
                fabric.print(f"note: at most {room} new tokens fit after the longest prompt in the model's window")
            ids = generate_batch(model, [encoded[i] for i in fits], max_new_tokens, temperature=0.0,
                                 eos_id=tokenizer.eos_id)
            for i, row in zip(fits, ids):
                responses[i] = tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip()
    finally:
        model.train()
    for i in sorted(set(range(len(prompts))) - set(fits)):
        fabric.print(f"warning: eval.prompts[{i}] ({encoded[i].numel()} tokens) does not fit the model's context "
                     f"of {window}; its response is empty")
    rows = [{"step": step, "prompt": p, "response": responses[i]} for i, p in enumerate(prompts)]
    with open(out_dir / GENERATIONS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def check_prompt_settings(prompts: Sequence[str], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"eval.prompt_max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("eval.prompts must be non-empty instructions")

