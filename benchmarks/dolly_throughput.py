"""The real workload's throughput (issue 23): Dolly instruction tuning, ours packed and padded against HF + PEFT.

Why: ``finetune_throughput.py`` times full rows of random tokens, where nothing is padding and every position is a
target. Instruction tuning is not like that: Dolly's examples range from tens to thousands of tokens, a padded
micro-batch of 4 computes about twice the positions it trains on, and the prompt (masked out of the loss) is a
third to a half of the real tokens. This benchmark times that workload on every side with the same examples:

* **data**: real Dolly records (``../shared/data/dolly``, ``prepare_dolly.py``'s split of them and its truncation
  policy), the LLaMA tokenizer (``../shared/data/tokenizers/llama``), the Alpaca template, the prompt masked out
  of the loss, examples capped at ``cap`` tokens (512 and 1024);
* **model**: a stories15M-shaped LLaMA (dim 288, 6 layers, 6 heads, 32,000-word vocabulary, the context raised to
  the cap) on random weights, the same init on our two sides and on HF's two, with LoRA or LLaMA-Adapter v2 (HF:
  ``hf_peft``, shared with ``finetune_throughput.py``);
* **four sides**, the same ``examples`` in the same ``steps`` optimizer steps of ``micro_batch_size x accum``
  examples (one epoch), AdamW, gradient clipping at 1.0, float32, ``threads`` threads:
  - ``ours_packed``: ``--data.packing true`` (``PackedStepBatchSampler``, ``micro_batch_tokens`` =
    micro_batch_size x cap), through ``Trainer.step``;
  - ``ours_padded``: the same steps' micro-batches padded to their longest, through ``Trainer.step``;
  - ``hf_padded``: the same micro-batches padded to their longest (what ``DataCollatorForSeq2Seq`` gives:
    ``attention_mask``, labels -100), ``model(**batch).loss`` / accum, backward, clipping, AdamW;
  - ``hf_grouped``: ``group_by_length``: the order of transformers' own ``LengthGroupedSampler``
    (``get_length_grouped_indices`` with the global batch and megabatches of 50 global batches, what ``Trainer``
    uses on the full data set), then as ``hf_padded``. HF's best exact option on CPU: its sdpa path does not
    isolate position-id-packed sequences there.

The sides take turns step by step in one process (the order rotates every step), so contention on a shared machine
hits all alike; each round is a fresh process. Reported per side: examples/s, real (non-padding) tokens/s and MFU
on real tokens (``lit_adapter.model.flops``: each example's own step FLOPs, over ``torch.mm``'s rate at the
model's shapes measured in the same process). The ratios are ours-packed's throughput over each other side's on
the whole run (median over rounds), with the quartiles of the per-step ratios of real tokens/s.

    python benchmarks/dolly_throughput.py --caps 512,1024 --methods lora,adapter_v2
    python benchmarks/dolly_throughput.py --caps 512 --methods lora --steps 2 --rounds 1     # a quick look
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # hf_peft, also when loaded by path (tests)

import hf_peft  # noqa: E402
from lit_adapter.errors import UserError, run_cli  # noqa: E402

SIDES = ("ours_packed", "ours_padded", "hf_padded", "hf_grouped")
METHODS = ("lora", "adapter_v2")
DOLLY = REPO.parent / "shared" / "data" / "dolly"
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama" / "tokenizer.model"
DOLLY_VAL_SIZE, DOLLY_SPLIT_SEED = 2000, 42  # scripts/prepare_dolly.py's split


def dolly_examples(cap: int, count: int, seed: int, source: Path = DOLLY, tokenizer: Path = TOKENIZER) -> List[dict]:
    """``count`` training examples of Dolly drawn at random (``seed``), tokenized as ``prepare_dolly.py`` does:
    the Alpaca template, BOS + prompt + response + EOS, the prompt masked, fitted to ``cap`` by shortening the
    context first (records that cannot fit are skipped, as the policy drops them)."""
    from lit_adapter.data.instructions import load_records, split_records
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.data.truncation import fit_record

    records, _ = load_records(source, schema="dolly")
    train, _ = split_records(records, DOLLY_VAL_SIZE, DOLLY_SPLIT_SEED)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    tok, out = Tokenizer(tokenizer), []
    for i in order:
        fitted = fit_record(train[i], tok, cap, mask_inputs=True, policy="context")
        if fitted.example is not None:
            out.append(fitted.example)
            if len(out) == count:
                return out
    raise UserError(f"only {len(out)} Dolly examples fit {cap} tokens; ask for fewer")


def schedule(lengths: Sequence[int], steps: int, micro_batch_size: int, accum: int, cap: int, seed: int
             ) -> Dict[str, List[List[List[int]]]]:
    """Per side, per optimizer step, its micro-batches as example indices: one epoch over exactly ``steps`` global
    batches, so every side trains on every example once in ``steps`` steps."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lit_adapter.data.packing import PackedStepBatchSampler

    per_step = micro_batch_size * accum
    if len(lengths) != steps * per_step:
        raise UserError(f"{len(lengths)} examples are not {steps} steps of {per_step}: one epoch is compared")
    packed = PackedStepBatchSampler(lengths, micro_batch_size, accum, 1, 0, seed, 0, steps,
                                    budget=micro_batch_size * cap)

    def micro(indices: List[int]) -> List[List[int]]:
        return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]

    padded = [micro(packed.order.step_indices(s)) for s in range(steps)]
    # group_by_length as HF's Trainer samples it on the full data set: LengthGroupedSampler(train_batch_size x
    # accumulation steps) sorts megabatches of 50 global batches by length (transformers' own function). On a
    # subset this small the sampler would shrink them (to len // (4 x batch)) and group far less: HF at its best.
    grouped = get_length_grouped_indices(list(lengths), per_step, mega_batch_mult=50,
                                         generator=torch.Generator().manual_seed(seed + 1))
    return {"ours_packed": [packed.step_micro_batches(s) for s in range(steps)], "ours_padded": padded,
            "hf_padded": padded, "hf_grouped": [micro(grouped[s * per_step : (s + 1) * per_step])
                                                for s in range(steps)]}


def seq2seq_collate(batch: Sequence[dict], pad_id: int = 0) -> dict:
    """What ``DataCollatorForSeq2Seq`` gives HF: right-padded to the longest, ``attention_mask``, labels -100."""
    import torch

    longest = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = ex["input_ids"], ex["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collated(examples: Sequence[dict], plan: Dict[str, List[List[List[int]]]]) -> Dict[str, List[List[dict]]]:
    """Each side's micro-batches as its loader collates them (ours: the objective's own collation)."""
    from lit_adapter.train.objectives import Objective

    objective = Objective()
    collate = {"ours_packed": objective.collate_packed, "ours_padded": lambda b: objective.collate(b, pad_id=0),
               "hf_padded": seq2seq_collate, "hf_grouped": seq2seq_collate}
    return {side: [[collate[side]([examples[i] for i in mb]) for mb in step] for step in steps]
            for side, steps in plan.items()}


class OursSide:
    """Our model (``memory.build_random_model``) set up by Fabric, stepped by ``Trainer.step`` as a run is."""

    def __init__(self, job: Dict[str, Any]) -> None:
        import torch

        from lit_adapter.memory import Cell, build_random_model
        from lit_adapter.train.fabric_setup import make_fabric
        from lit_adapter.train.trainer import Trainer, method_optimizer

        torch.manual_seed(0)
        cell = Cell(method=job["method"], model_name=job["model"], seq_len=job["cap"],
                    micro_batch_size=job["micro_batch_size"], precision="32-true", device="cpu",
                    config_overrides={"block_size": job["cap"], **job.get("config_overrides", {})})
        model = build_random_model(cell, torch.device("cpu")).train()
        optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
        fabric = make_fabric("cpu", precision="32-true")
        model, optimizer = fabric.setup(model, optimizer)
        self.config = cell.config()
        self.trainer = Trainer(fabric, model, optimizer, batches=(), accum=job["accum"], max_grad_norm=1.0)

    def step(self, micro_batches: List[dict]) -> float:
        self.trainer.batches = iter(micro_batches)
        return self.trainer.step().loss


class HFSide:
    """HF ``LlamaForCausalLM`` + PEFT (``hf_peft.peft_model``), stepped as PEFT users write it."""

    def __init__(self, job: Dict[str, Any], config) -> None:
        import torch

        from lit_adapter.memory import make_optimizer

        torch.manual_seed(0)
        self.model = hf_peft.peft_model(config, job["method"], "cpu", torch.float32, job["cap"]).train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, "adamw")

    def step(self, micro_batches: List[dict]) -> float:
        import torch

        total = 0.0
        for batch in micro_batches:
            loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)


def prepare(job: Dict[str, Any]):
    """The job's examples, its schedule and each side's collated micro-batches."""
    examples = dolly_examples(job["cap"], job["steps"] * job["micro_batch_size"] * job["accum"], job["seed"],
                              Path(job.get("source", DOLLY)), Path(job.get("tokenizer", TOKENIZER)))
    lengths = [len(ex["input_ids"]) for ex in examples]
    plan = schedule(lengths, job["steps"], job["micro_batch_size"], job["accum"], job["cap"], job["seed"])
    return examples, plan, collated(examples, plan)


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """One round: the four sides built in this process, taking turns step by step."""
    import torch

    from lit_adapter.model import flops

    torch.set_num_threads(job["threads"])
    examples, plan, batches = prepare(job)
    ours = {"ours_packed": OursSide(job), "ours_padded": OursSide(job)}
    config = ours["ours_packed"].config
    sides = {**ours, "hf_padded": HFSide(job, config), "hf_grouped": HFSide(job, config)}
    backward_from = flops.first_backward_layer(ours["ours_packed"].trainer.model)
    lengths = [len(ex["input_ids"]) for ex in examples]
    # model FLOPs on real tokens: each example's own step (its attention at its own length), whatever the side
    real_flops = {side: [sum(flops.step_flops(config, lengths[i], 1, backward_from=backward_from).total
                             for mb in step for i in mb) for step in steps] for side, steps in plan.items()}
    rate = flops.measure_matmul_rate(config, job["micro_batch_size"] * job["cap"] // 2).model_weighted
    for _ in range(job["warmup"]):  # untimed, on the first step's data, alike on every side
        for name, side in sides.items():
            side.step(batches[name][0])
    names = list(SIDES)
    times: Dict[str, List[float]] = {name: [] for name in names}
    losses: Dict[str, List[float]] = {name: [] for name in names}
    for s in range(job["steps"]):
        for name in names[s % len(names):] + names[:s % len(names)]:
            t0 = time.perf_counter()
            losses[name].append(sides[name].step(batches[name][s]))
            times[name].append(time.perf_counter() - t0)
    rate = (rate + flops.measure_matmul_rate(config, job["micro_batch_size"] * job["cap"] // 2).model_weighted) / 2
    return {"times": times, "losses": losses, "matmul_rate": rate, "real_flops": real_flops,
            "examples": {n: [sum(len(mb) for mb in step) for step in plan[n]] for n in names},
            "real_tokens": {n: [sum(lengths[i] for mb in step for i in mb) for step in plan[n]] for n in names},
            "computed_positions": {n: [sum(b["input_ids"].numel() for b in step) for step in batches[n]]
                                   for n in names}}


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per side: examples/s, real tokens/s, MFU on real tokens, padding share; ours-packed's ratios over the
    others (whole run, median over rounds) and the quartiles of the per-step ratios of real tokens/s."""
    row: Dict[str, Any] = {"rounds": len(runs)}
    for side in SIDES:
        total = [sum(run["times"][side]) for run in runs]
        t = statistics.median(total)
        r0 = runs[0]
        row[side] = {
            "examples_per_s": sum(r0["examples"][side]) / t,
            "real_tokens_per_s": sum(r0["real_tokens"][side]) / t,
            "mfu_real": statistics.median(sum(run["real_flops"][side]) / sum(run["times"][side]) / run["matmul_rate"]
                                          for run in runs),
            "padding_share": 1 - sum(r0["real_tokens"][side]) / sum(r0["computed_positions"][side]),
            "first_loss": r0["losses"][side][0],
        }
    for other in SIDES[1:]:
        whole = [sum(run["times"][other]) / sum(run["times"]["ours_packed"]) for run in runs]
        steps = [(run["real_tokens"]["ours_packed"][s] / run["times"]["ours_packed"][s])
                 / (run["real_tokens"][other][s] / run["times"][other][s])
                 for run in runs for s in range(len(run["times"][other]))]
        quartiles = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
        row[f"packed_over_{other}"] = {"ratio": statistics.median(whole), "step_quartiles": quartiles}
    return row


def main(
    caps: str = "512,1024",
    methods: str = "lora,adapter_v2",
    steps: int = 4,
    micro_batch_size: int = 4,
    accum: int = 4,
    rounds: int = 1,
    warmup: int = 1,
    threads: int = 2,
    seed: int = 0,
    model: str = "stories15M",
    source: Path = DOLLY,
    tokenizer: Path = TOKENIZER,
    timeout_s: float = 3600.0,
    out_json: Optional[Path] = None,
) -> List[Dict[str, Any]]:
    """Dolly throughput: ours packed and padded against HF + PEFT padded and grouped by length.

    Args:
        caps: Comma-separated example caps in tokens (the context of the model too).
        methods: Comma-separated: lora, adapter_v2.
        steps: Optimizer steps per side per round; the examples are ``steps x micro_batch_size x accum`` Dolly
            records drawn at random (one epoch of them).
        micro_batch_size: Examples per micro-batch (ours packed: micro_batch_tokens = micro_batch_size x cap).
        accum: Micro-batches per optimizer step (the global batch is micro_batch_size x accum).
        rounds: Fresh processes per cap and method; the whole-run ratios are their median. The defaults (4 steps,
            1 round: 64 examples per side, every side's steps interleaved) take about 8 minutes on 2 CPU cores for
            both caps and both methods; raise both for tighter quartiles.
        warmup: Untimed steps per side before the timed ones (on the first step's data).
        threads: torch threads.
        seed: Which records are drawn and the samplers' seed.
        model: The model shape (``Config.from_name``), random weights; its context is raised to the cap.
        source: The Dolly records (a folder of JSON files or a file).
        tokenizer: The SentencePiece ``tokenizer.model`` (LLaMA's).
        timeout_s: Limit per round.
        out_json: Also write the results here (e.g. out/dolly_throughput.json).
    """
    cap_list = [int(c) for c in caps.split(",") if c.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for path in (source, tokenizer):
        if not Path(path).exists():
            raise UserError(f"{path} does not exist: the benchmark reads the shared Dolly records and LLaMA tokenizer")
    info = hf_peft.machine()
    print(f"# machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, transformers "
          f"{info['transformers']}, peft {info['peft']}; commit {info['commit']}; {info['date']}; load average at "
          f"start {info['load_average']}; {steps} steps of {micro_batch_size} x {accum} examples, {rounds} rounds, "
          f"{threads} threads", flush=True)
    results = []
    for cap in cap_list:
        for method in method_list:
            job = dict(cap=cap, method=method, steps=steps, micro_batch_size=micro_batch_size, accum=accum,
                       warmup=warmup, threads=threads, seed=seed, model=model, source=str(source),
                       tokenizer=str(tokenizer))
            runs = [hf_peft.run_worker(__file__, "--worker", job, timeout_s) for _ in range(rounds)]
            row = {"cap": cap, "method": method, **summarize(runs)}
            results.append(row)
            print(f"dolly{cap} {method}: ours-packed/HF-padded {row['packed_over_hf_padded']['ratio']:.2f}, "
                  f"ours-packed/HF-grouped {row['packed_over_hf_grouped']['ratio']:.2f}", flush=True)
    print()
    print("| cap | method | side | examples/s | real tokens/s | MFU (real tokens) | padding share | ours-packed / "
          "side (whole run) | per-step quartiles |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for side in SIDES:
            s = row[side]
            ratio = row.get(f"packed_over_{side}")
            versus = f"**{ratio['ratio']:.2f}**" if ratio else "1"
            quart = "–".join(f"{q:.2f}" for q in (ratio["step_quartiles"][0], ratio["step_quartiles"][2])) \
                if ratio else ""
            print(f"| {row['cap']} | {row['method']} | {side} | {s['examples_per_s']:.2f} | "
                  f"{s['real_tokens_per_s']:.0f} | {100 * s['mfu_real']:.0f}% | {100 * s['padding_share']:.0f}% | "
                  f"{versus} | {quart} |")
    print(f"\nload average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if out_json:
        hf_peft.write_json(out_json, {"machine": info, "results": results})
    return results


if __name__ == "__main__":
    import json

    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        from jsonargparse import CLI

        run_cli(CLI, main, as_positional=False)
