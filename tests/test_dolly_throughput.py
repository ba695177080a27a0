"""benchmarks/dolly_throughput.py's core on a tiny setting: the four sides (ours packed and padded, HF + PEFT padded
and grouped by length) train on the same Dolly examples and tokens in the same number of steps, each side's
micro-batches are what its collator makes of them, one interleaved round runs, and ``--help`` works."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _bench():
    spec = importlib.util.spec_from_file_location("dolly_throughput", REPO / "benchmarks" / "dolly_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dolly_throughput"] = module
    spec.loader.exec_module(module)
    return module


JOB = dict(cap=128, method="lora", steps=2, micro_batch_size=2, accum=2, warmup=0, threads=1, seed=0,
           model="stories260K", config_overrides={"vocab_size": 32000, "padded_vocab_size": 32000})


@pytest.fixture(scope="module")
def prepared():
    if not (SHARED / "dolly").exists():
        pytest.skip("the shared Dolly records are not beside the checkout")
    bench = _bench()
    return bench, bench.prepare(JOB)


def test_every_side_trains_on_the_same_examples_and_tokens(prepared):
    bench, (examples, plan, batches) = prepared
    assert len(examples) == 8 and all(len(ex["input_ids"]) <= JOB["cap"] for ex in examples)
    assert all((ex["labels"] == -100).any() for ex in examples)  # the prompt is masked out of the loss
    everything = sorted(range(len(examples)))
    for side in bench.SIDES:
        assert len(plan[side]) == JOB["steps"]
        assert sorted(i for step in plan[side] for mb in step for i in mb) == everything, side
        # ours packed: one row per micro-batch within the token budget; the others: micro_batch_size rows
        for step in batches[side]:
            assert len(step) == JOB["accum"]
    lengths = [len(ex["input_ids"]) for ex in examples]
    # the same steps for ours packed, ours padded and HF padded; grouped by length reorders the epoch
    for side in ("ours_padded", "hf_padded"):
        assert [sorted(i for mb in step for i in mb) for step in plan[side]] == \
               [sorted(i for mb in step for i in mb) for step in plan["ours_packed"]]
    # the real tokens and the target tokens each side's batches hold are the examples' own
    real = {side: sum(b["attention_mask"].sum().item() if "attention_mask" in b else
                      (sum(b["lengths"]) if "lengths" in b else sum(lengths[i] for i in mb))
                      for step, idx in zip(batches[side], plan[side]) for b, mb in zip(step, idx))
            for side in bench.SIDES}
    assert set(real.values()) == {sum(lengths)}
    targets = {side: sum(int((b["labels"][:, 1:] != -100).sum()) for step in batches[side] for b in step)
               for side in bench.SIDES}
    assert len(set(targets.values())) == 1
    computed = {side: sum(b["input_ids"].numel() for step in batches[side] for b in step) for side in bench.SIDES}
    assert computed["ours_packed"] == sum(lengths)  # no padding at all
    assert computed["hf_grouped"] <= computed["hf_padded"] == computed["ours_padded"]  # grouping by length pads less
    for step in batches["ours_packed"]:
        assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 2 * JOB["cap"] for b in step)
    for side in ("ours_padded", "hf_padded", "hf_grouped"):
        for step, idx in zip(batches[side], plan[side]):
            for b, mb in zip(step, idx):
                assert b["input_ids"].shape == (len(mb), max(lengths[i] for i in mb))


def test_one_round_runs_every_side_through_its_step(prepared):
    bench, _ = prepared
    run = bench.worker(JOB)
    for side in bench.SIDES:
        assert len(run["times"][side]) == JOB["steps"] and all(t > 0 for t in run["times"][side])
        assert sum(run["examples"][side]) == 8
    assert len({sum(run["real_tokens"][side]) for side in bench.SIDES}) == 1
    # the same examples in the same step: ours packed and padded start from the same loss
    assert run["losses"]["ours_packed"][0] == pytest.approx(run["losses"]["ours_padded"][0], rel=1e-5)
    row = bench.summarize([run])
    assert row["packed_over_hf_padded"]["ratio"] > 0 and len(row["packed_over_hf_grouped"]["step_quartiles"]) == 3


def test_help():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dolly_throughput.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--caps" in out.stdout and "--methods" in out.stdout
