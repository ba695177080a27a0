"""The run's ``--eval.prompts``: the trained model's greedy answers at the end of a run, written beside its
outputs (``generations.jsonl``) and handed to the run record (a WandB table).

``--eval.prompts_per_category N`` adds a fixed sample of the validation split, N examples per task category
(Dolly's open QA, creative writing, ...), answered from their own prompt (input included) with the reference
response beside the answer: a reader sees what each task's loss means in text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lit_adapter.errors import UserError

GENERATIONS_FILE = "generations.jsonl"
# objectives whose model is a language model that can answer an instruction (not a classification head)
ANSWERING_OBJECTIVES = ("next_token", "dpo")


def answer_prompts(fabric, model, checkpoint_dir: Path, prompts: Sequence[str], max_new_tokens: int, step: int,
                   out_dir: Path, objective, samples: Sequence[Dict[str, Any]] = (),
                   chat_template: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The trained model's greedy answers to ``prompts`` (instructions, in the training data's template: the Alpaca
    one, or the recorded ``chat_template`` of chat data, each prompt a user turn) and to the prepared validation
    ``samples`` (:func:`lit_adapter.data.instructions.category_sample`), written to ``out_dir/generations.jsonl``:
    one ``{"step", "category", "prompt", "reference", "response"}`` per prompt (``category`` and ``reference``
    empty for ``prompts``). Rank 0 decodes; with FSDP (sharded weights) and with objectives whose model does not
    produce text nothing is answered."""
    if (not prompts and not samples) or fabric.global_rank != 0:
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
    end_of_turn, marker = None, ""
    asked = [{"category": "", "prompt": generate_prompt(InstructionRecord(instruction=p)), "reference": "",
              "shown": p} for p in prompts]
    if chat_template:
        import torch

        from lit_adapter.data.chat import ChatTemplate, encode_chat, end_of_turn_id

        chat = ChatTemplate.from_dict(chat_template)
        encoded = [torch.tensor(encode_chat(tokenizer, chat.prompt(p))[0], device=fabric.device) for p in prompts]
        marker = chat_template.get("end_of_turn", "")
        end_of_turn = end_of_turn_id(tokenizer, marker)
    else:
        encoded = [tokenizer.encode(a["prompt"], bos=True, device=fabric.device) for a in asked]
    # prepared validation examples are prompted with what they were trained on (their own tokens' prompt part)
    samples = [split_sample(tokenizer, ex) for ex in samples]
    encoded += [tokenizer.encode(a["prompt"], bos=True, device=fabric.device) for a in samples]
    asked += samples
    prompts = [a["shown"] for a in asked]
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
                                 eos_id=tokenizer.eos_id,
                                 stop=lambda row, ids: bool(ids) and (ids[-1] == end_of_turn or bool(marker) and (
                                     marker in tokenizer.decode(ids))))
            for i, row in zip(fits, ids):
                text = tokenizer.decode([t for t in row if t not in (tokenizer.eos_id, end_of_turn)])
                responses[i] = (text.split(marker)[0] if marker else text).strip()
    finally:
        model.train()
    for i in sorted(set(range(len(prompts))) - set(fits)):
        fabric.print(f"warning: eval.prompts[{i}] ({encoded[i].numel()} tokens) does not fit the model's context "
                     f"of {window}; its response is empty")
    rows = [{"step": step, "category": asked[i]["category"], "prompt": p, "reference": asked[i]["reference"],
             "response": responses[i]} for i, p in enumerate(prompts)]
    with open(out_dir / GENERATIONS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def split_sample(tokenizer, example: Dict[str, Any]) -> Dict[str, str]:
    """A prepared example as ``{"category", "prompt", "reference", "shown"}``: its tokens decoded and cut after the
    template's response marker (the prompt, as trained on) and the reference response after it (EOS dropped)."""
    from lit_adapter.data.prompts import RESPONSE_MARKER

    ids = [t for t in example["input_ids"].tolist() if t not in (tokenizer.bos_id, tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    cut = text.find(RESPONSE_MARKER.strip())
    prompt, reference = (text, "") if cut < 0 else (text[:cut] + RESPONSE_MARKER, text[cut + len(RESPONSE_MARKER):])
    return {"category": example.get("category", ""), "prompt": prompt, "reference": reference.strip(),
            "shown": prompt}


def check_prompt_settings(prompts: Sequence[str], max_new_tokens: int, per_category: int = 0) -> None:
    if per_category < 0:
        raise UserError(f"eval.prompts_per_category must be >= 0, got {per_category}")
    if max_new_tokens < 1:
        raise UserError(f"eval.prompt_max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("eval.prompts must be non-empty instructions")

