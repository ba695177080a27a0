"""The comparison grid's axes, overrides, listing, results files and WandB runs. The miniature is a real grid:
stories260K, 40 Dolly records, 2 optimizer steps, two seeds of one cell and a LoRA cell whose rank needs about
275 GB for one matrix, which the CPU allocator really refuses (a real out-of-memory, not a stand-in)."""

import base64
import csv
import json
import re
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_adapter.grid.runner import grid_cells, load_grid, run_grid
from lit_adapter.errors import UserError
from lit_adapter.grid.spec import parse_overrides
from lit_adapter.grid.wandb_runs import run_id

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 160
OOM_RANK = 2 ** 30  # a 2^30 x 64 float32 LoRA matrix: 275 GB, more than the machine has


def write_grid(path: Path, checkpoint: Path, shared_data: Path, out_dir: Path, **extra) -> Path:
    grid = {
        "name": "mini",
        "checkpoint_dir": str(checkpoint),
        "out_dir": str(out_dir),
        "data": {"source": str(shared_data / "dolly" / "local_training_1.json"), "val_size": 8, "max_records": 40,
                 "seed": 1},
        "context_lengths": [CONTEXT],
        "seeds": [1, 2],
        "common": {"train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "warmup_steps": 1,
                             "save_interval": 2},
                   "eval": {"interval": 2, "max_batches": 1},
                   "fabric": {"accelerator": "cpu", "precision": "32-true"}},
        "runs": [{"name": "adapter", "script": "adapter", "args": {"adapter": {"start_layer": 0}}},
                 {"name": "lora_huge", "script": "lora", "seeds": [1], "args": {"lora": {"r": OOM_RANK}}}],
        **extra,
    }
    path.write_text(yaml.safe_dump(grid))
    return path


def wandb_records(path: Path):
    """The records of a ``run-*.wandb`` file, parsed with wandb's own protobuf (this wandb has no Python reader
    of the file): its LevelDB-style log of 32 KiB blocks, each record split into FULL/FIRST/MIDDLE/LAST chunks
    behind a 7-byte header (crc32, length, type), after a 7-byte file header (":W&B", magic 0xBEE1, version)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_wandb_run(cell_folder: Path):
    """Every offline run written in a cell's folder: (run record, summary, exit code) each."""
    runs = []
    for path in sorted(cell_folder.glob("wandb/offline-run-*/run-*.wandb")):
        run, summary, exit_code = None, {}, None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
            elif kind == "exit":
                exit_code = record.exit.exit_code
        runs.append((run, summary, exit_code))
    return runs


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "run_comparison.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_print_cells_and_dry_run_of_the_dolly_grid_without_weights(capsys):
    script = _load_script()
    script.main(**script.parse_args(["--config", str(REPO / "configs/dolly_comparison_512.yaml"), "--dry_run", "true",
                                     "--model_name", "Llama-2-7b"]))
    stdout = capsys.readouterr().out
    lines = [line.split(" | ") for line in stdout.splitlines() if "/s1337" in line]
    names = [cols[0].strip() for cols in lines]
    assert names == [f"{m}/{q}/s1337" for m in ("adapter", "adapter+sparse", "adapter_v2", "adapter_v2+sparse")
                     for q in ("bf16", "int8", "nf4")] + ["lora/bf16/s1337", "qlora/nf4/s1337"]
    trainable = {cols[0].strip(): int(cols[6].replace(",", "")) for cols in lines}
    # LLaMA-Adapter on 7B: a 10-token prompt in each of the top 30 layers plus their gates (1.2M, as the paper's)
    assert trainable["adapter/nf4/s1337"] == 30 * (10 * 4096 + 32) == 1_229_760
    assert trainable["lora/bf16/s1337"] == 32 * 2 * 8 * (4096 + 4096)  # r=8 on query and value
    peaks = {cols[0].strip(): float(cols[7].split()[0]) for cols in lines}
    assert peaks["adapter/nf4/s1337"] < peaks["adapter/int8/s1337"] < peaks["adapter/bf16/s1337"]
    assert "not a measurement" in stdout


def _load_script(name="run_comparison"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_miniature_grid_writes_every_result_and_one_wandb_run_per_cell(tmp_path, stories260k, shared_data,
                                                                       monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = parse_overrides(["--common.logger.logger_name", "wandb", "--common.logger.project", "grid-test"])
    grid = load_grid(write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out"), overrides)
    rows = run_grid(grid)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("adapter/fp32/s1", "completed"), ("adapter/fp32/s2", "completed"), ("lora_huge/fp32/s1", "OOM")]
    assert "can't allocate memory" in rows[2]["reason"]
    out = grid.out_dir
    # the seeds differ (initialisation and data order) and both are kept, per seed, in the CSV and JSON
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["name"], r["seed"], r["status"]) for r in table] == [
        ("adapter/fp32/s1", "1", "completed"), ("adapter/fp32/s2", "2", "completed"), ("lora_huge/fp32/s1", "1", "OOM")]
    final = [float(r["val_loss"]) for r in table[:2]]
    assert final[0] != final[1]
    results = json.loads((out / "results.json").read_text())
    assert [c["seed"] for c in results["cells"]] == [1, 2, 1] and results["commit"] and results["machine"]
    summaries = [json.loads((out / f"adapter-fp32-s{s}" / "summary.json").read_text()) for s in (1, 2)]
    assert final == [s["final_val_loss"] for s in summaries]
    group = results["groups"][0]
    assert group["group"] == "adapter/fp32" and group["completed"] == 2
    assert group["val_loss"] == pytest.approx([statistics.mean(final), statistics.stdev(final)])
    assert results["groups"][1]["statuses"] == ["OOM"] and results["groups"][1]["val_loss"] is None
    # results.md: Table 3's layout, a column per cell, mean ± std over the seeds
    md = (out / "results.md").read_text()
    assert "|  | adapter/fp32 | lora_huge/fp32 |" in md
    mean, std = statistics.mean(final), statistics.stdev(final)
    assert f"| Val loss (final) | {mean:.4f} ± {std:.4f} | — |" in md
    params = summaries[0]["trainable_params"]
    assert f"| Parameters tuned | {params:,} | — |" in md and "| Status | completed | OOM |" in md
    assert re.search(r"Measured on .+, \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \w+", md)
    # the local dashboard, and the report with the table and the pictures inside it
    assert (out / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 2 and base64.b64decode(embedded[0]) == (out / "dashboard.png").read_bytes()
    assert "<th>Val loss (final)</th>" in html and f"{mean:.4f} ± {std:.4f}" in html
    # one offline WandB run per cell, in the grid's group, tagged with its axes; the OOM cell's run has its status
    for row, tags in ((rows[0], "method:adapter attention:dense quantize:none context:160 seed:1"),
                      (rows[1], "method:adapter attention:dense quantize:none context:160 seed:2"),
                      (rows[2], "method:lora attention:dense quantize:none context:160 seed:1")):
        runs = read_wandb_run(Path(row["folder"]))
        assert runs, row["name"]
        for run, _, _ in runs:
            assert (run.run_group, run.display_name, run.job_type, run.project) == ("mini", row["name"], row["name"],
                                                                              "grid-test")
            assert run.run_id == run_id("mini", row["name"]) and re.fullmatch(r"[A-Za-z0-9_-]+", run.run_id)
            assert list(run.tags) == tags.split()
    (*_, (_, summary, exit_code)) = read_wandb_run(Path(rows[2]["folder"]))
    assert summary["status"] == "OOM" and "can't allocate memory" in summary["reason"] and exit_code == 1
    # plot_comparison.py re-renders the pictures and the report from the results
    (out / "dashboard.png").unlink()
    (out / "report.html").unlink()
    _load_script("plot_comparison").main(out)
    assert (out / "dashboard.png").is_file() and f"{mean:.4f} ± {std:.4f}" in (out / "report.html").read_text()


def test_axes_expand_into_named_cells_and_overrides_reach_every_cell(tmp_path, stories260k, shared_data):
    from lit_adapter.grid.runner import cell_config

    path = write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out",
                      quantize=["none", "bnb.int8", "bnb.nf4"],
                      attention={"dense": {}, "sparse": {"pattern": "shifted", "group_size_ratio": 0.25}})
    raw = yaml.safe_load(path.read_text())
    raw["runs"][1].update(quantize=["bnb.nf4"], attention=["dense"], seeds=[7])
    path.write_text(yaml.safe_dump(raw))
    overrides = parse_overrides(["--common.train.learning_rate", "3e-3", "--train.max_steps=5",
                                 "--seeds", "[7, 8]", "--data.val_size", "6"])
    grid = load_grid(path, overrides)
    cells = grid_cells(grid)
    assert [c.name for c in cells] == [
        "adapter/fp32/s7", "adapter/fp32/s8", "adapter/int8/s7", "adapter/int8/s8", "adapter/nf4/s7",
        "adapter/nf4/s8", "adapter+sparse/fp32/s7", "adapter+sparse/fp32/s8", "adapter+sparse/int8/s7",
        "adapter+sparse/int8/s8", "adapter+sparse/nf4/s7", "adapter+sparse/nf4/s8", "lora_huge/nf4/s7"]
    config = cell_config(grid, cells[10])
    assert config["quantize"] == "bnb.nf4" and config["attention"] == {"pattern": "shifted", "group_size_ratio": 0.25}
    assert config["train"]["learning_rate"] == 3e-3 and config["train"]["max_steps"] == 5
    assert config["train"]["seed"] == 7 and grid.data["val_size"] == 6
    assert cell_config(grid, cells[0])["quantize"] is None and "attention" not in cell_config(grid, cells[0])
    assert "logger" not in config  # no WandB settings unless the cells log to WandB
    assert [c.name for c in grid_cells(grid, ["adapter+sparse/nf4", "*/int8/s8"])] == [
        "adapter/int8/s8", "adapter+sparse/int8/s8", "adapter+sparse/nf4/s7", "adapter+sparse/nf4/s8"]
    assert run_id("dolly-512", "adapter_v2+sparse/nf4/s1337") != run_id("dolly-512", "adapter_v2/sparse/nf4/s1337")


@pytest.mark.parametrize("args, message", [
    (["--quantize", "[none, bnb.nf5]"], "unknown quantize 'bnb.nf5'; choose from none, bnb.int8, bnb.nf4"),
    (["--common.train.learnin_rate", "3e-3"], "unknown option train.learnin_rate (did you mean train.learning_rate?)"),
    (["--trian.max_steps", "3"], "unknown option --trian.max_steps; grid options: --name"),
    (["--only", "adapter", "nothing*"], "--only 'nothing*' matches no cell of the grid"),
])
def test_bad_grid_input_is_a_user_error(args, message):
    script = _load_script()
    with pytest.raises(UserError) as err:
        script.main(**script.parse_args(["--config", str(REPO / "configs/dolly_comparison_512.yaml"),
                                         "--print_cells", "true", *args]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_grid_input_is_one_line_without_traceback():
    proc = _run("--config", "configs/dolly_comparison_512.yaml", "--print_cells", "true", "--only", "adapter",
                "nothing*")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--only 'nothing*' matches no cell of the grid" in errors[0], proc.stderr


def test_a_grid_of_zero_cells_is_refused(tmp_path, stories260k, shared_data):
    path = write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out", runs=[])
    with pytest.raises(UserError, match="the grid has no cells"):
        grid_cells(load_grid(path))


def test_a_cell_whose_seeds_partly_failed_says_so():
    from lit_adapter.grid.report import markdown

    def row(seed, status, loss=None):
        done = status == "completed"
        return {"name": f"adapter/nf4/s{seed}", "group": "adapter/nf4", "seed": seed, "status": status,
                "trainable_params": 3240 if done else None, "val_loss": loss, "avg_train_loss": loss,
                "avg_val_loss": loss, "train_time_s": 65.0 if done else 3.0, "tokens_per_s": 100.0 if done else None,
                "peak_memory_gb": 0.5 if done else None, "reason": "" if done else "CUDA out of memory"}

    md = markdown([row(1, "completed", 2.0), row(2, "completed", 3.0), row(3, "OOM")], "t",
                  {"machine": "m", "date": "d", "commit": "c"})
    # the mean and sample std of the two seeds that completed, marked as two of three
    assert "| Val loss (final) | 2.5000 ± 0.7071 (n=2) |" in md
    assert "| Training time | 1m 05s ± 0.0s (n=2) |" in md  # the OOM seed's 3 s are not a training time
    assert "| Status | completed 2/3, OOM 1/3 |" in md
    assert "adapter/nf4/s3: OOM: CUDA out of memory" in md
