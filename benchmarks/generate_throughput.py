"""Greedy decoding speed against HF ``generate``: same weights, same prompt, both with a KV cache, one process.

Both sides hold the same random weights (stories15M-sized by default: memory and speed do not depend on the
values), decode the same prompt greedily for ``--new_tokens`` tokens and must produce the same tokens (checked).
Rounds alternate the sides, so load on a shared machine hits both alike; the table reports the median tokens/s
of each side and the ratio ours / HF per round (median and quartiles). ``--compile true`` adds our compiled
decode step (its compile time is reported apart). Prefill is included in both sides' time, as a user sees it.

    python benchmarks/generate_throughput.py                         # the table in docs/throughput.md
    python benchmarks/generate_throughput.py --size tiny --rounds 3 --new_tokens 32 --compile false
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_adapter.errors import UserError, run_cli  # noqa: E402


def _models(size: str, seed: int):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_oracle import hf_llama

    from lit_adapter.model.config import Config
    from lit_adapter.model.gpt import GPT

    torch.manual_seed(seed)
    ours = GPT(Config.from_name(size)).eval()
    ours.init_weights(std=0.2)  # peaked logits: greedy choices are not decided by rounding
    hf = hf_llama(ours).eval()
    hf.config._attn_implementation = "sdpa"  # HF's default attention, as users run it
    return ours, hf


def _timed(fn) -> tuple:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(size: str = "stories15M", prompt_tokens: int = 16, new_tokens: int = 128, rounds: int = 7,
         compile: bool = True, threads: Optional[int] = None, seed: int = 0, out_json: Optional[Path] = None) -> None:
    """Tokens/s of greedy decoding, ours (eager and compiled) against HF ``generate``, interleaved in one process.

    Args:
        size: A model name of ``Config.from_name`` (random weights of that shape).
        prompt_tokens: Length of the (random) prompt.
        new_tokens: Tokens to generate per round.
        rounds: Alternating rounds per side (the first, a warm-up, is not counted).
        compile: Also time our torch.compile'd decode step.
        threads: torch threads (default: torch's choice).
        seed: Seed of the weights and the prompt.
        out_json: Also write the results here.
    """
    import torch

    from lit_adapter.generation.decode import generate_batch
    from hf_peft import machine

    if rounds < 2 or new_tokens < 1 or prompt_tokens < 1:
        raise UserError("rounds must be >= 2 (the first is a warm-up), new_tokens and prompt_tokens >= 1")
    if threads:
        torch.set_num_threads(threads)
    ours, hf = _models(size, seed)
    prompt = torch.randint(1, ours.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))

    def run_ours(compiled: bool = False) -> List[int]:
        return generate_batch(ours, [prompt], new_tokens, temperature=0.0, compile=compiled)[0]

    def run_hf() -> List[int]:
        with torch.inference_mode():
            out = hf.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=0)
        return out[0, prompt_tokens:].tolist()

    sides = {"ours": run_ours, "hf": run_hf}
    compile_s = None
    if compile:
        _, compile_s = _timed(lambda: run_ours(True))  # the first call compiles
        sides["ours (compiled)"] = lambda: run_ours(True)
    times: Dict[str, List[float]] = {name: [] for name in sides}
    outputs: Dict[str, List[int]] = {}
    for round_ in range(rounds):
        for name, fn in sides.items():
            tokens, seconds = _timed(fn)
            outputs[name] = tokens
            if round_:
                times[name].append(seconds)
    reference = outputs["hf"]
    for name, tokens in outputs.items():
        if tokens != reference:
            raise RuntimeError(f"{name} decoded other tokens than HF generate: the comparison would be meaningless")
    rate = {name: [new_tokens / t for t in ts] for name, ts in times.items()}
    rows = []
    for name in sides:
        ratios = sorted(o / h for o, h in zip(rate[name], rate["hf"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append({"side": name, "tokens_per_s": statistics.median(rate[name]), "ratio_vs_hf": statistics.median(ratios),
                     "ratio_q1": q[0], "ratio_q3": q[2]})
    info = {**machine(), "size": size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "rounds": rounds - 1, "threads": torch.get_num_threads(), "compile_s": compile_s}
    print(f"greedy decoding, {size} random weights, prompt {prompt_tokens}, {new_tokens} new tokens, "
          f"{rounds - 1} interleaved rounds, {info['threads']} threads; {info['cpu']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, commit {info['commit']}, {info['date']}")
    print("| side | tokens/s (median) | ours / HF (median) | quartiles |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['tokens_per_s']:,.1f} | {r['ratio_vs_hf']:.2f} | "
              f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} |")
    if compile_s is not None:
        print(f"compile time of our decode step (first call, not in the table): {compile_s:.1f} s")
    if out_json is not None:
        Path(out_json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_cli(CLI, main, as_positional=False)
