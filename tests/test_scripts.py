"""Command lines: --help reads like documentation, --dry_run counts, every configs/*.yaml loads."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_adapter.grid.runner import classify_failure, expand, load_grid, run_config
from lit_adapter.model.config import Config
from lit_adapter.grid.validation import CellChecker

REPO = Path(__file__).resolve().parents[1]
FINETUNE = ["adapter", "adapter_v2", "lora", "full"]


def load_setup(script):
    spec = importlib.util.spec_from_file_location(f"finetune_{script}", REPO / "finetune" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.setup


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_help_documents_the_options(capsys):
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    for method in FINETUNE:
        with pytest.raises(SystemExit) as exit_info:
            CLI(load_setup(method), args=["--help"], as_positional=False)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text
        assert "Examples per optimizer step" in text  # dataclass field docstrings reach --help
        assert "Linear warmup length in optimizer steps" in text
    for script in ["generate/base.py", "scripts/run_comparison.py"]:  # and as a real command line
        proc = run_script(REPO / script, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


# Trainable-parameter counts of lit-llama on LLaMA 7B (adapter: 30 layers x (10 x 4096 prompt + 32 gates);
# adapter v2 adds bias+scale on every linear and the RMSNorm weights) and PEFT's LoRA r=8 on q,v.
@pytest.mark.parametrize("method, trainable", [("adapter", 1_229_760), ("adapter_v2", 4_279_744),
                                               ("lora", 4_194_304), ("full", 6_738_415_616)])
def test_dry_run_counts_7b_without_allocating(method, trainable, capsys):
    from jsonargparse import CLI

    CLI(load_setup(method), args=["--model_name", "7B", "--dry_run", "true"], as_positional=False)
    out = capsys.readouterr().out
    assert f"trainable parameters: {trainable}\n" in out
    assert "total parameters:" in out


def test_dry_run_from_the_command_line():
    proc = run_script(REPO / "finetune" / "adapter.py", "--model_name", "7B", "--dry_run", "true")
    assert proc.returncode == 0, proc.stderr
    assert "trainable parameters: 1229760\n" in proc.stdout
    # the analytic estimate of the run's peak, labelled as one: 7B in float32 on CPU at 2048 tokens, micro batch 4
    assert "peak memory estimate per device (analytic, not measured)" in proc.stdout
    peak = re.search(r"PEAK\s+([0-9.]+) GB", proc.stdout)
    assert peak and 27 < float(peak.group(1)) < 200, proc.stdout  # at least the float32 weights (27 GB)
    # a pattern the estimator does not model still gets its counts, and says why there is no estimate
    proc = run_script(REPO / "finetune" / "adapter.py", "--model_name", "7B", "--dry_run", "true",
                      "--attention.pattern", "strided")
    assert proc.returncode == 0, proc.stderr
    assert "trainable parameters: 1229760\n" in proc.stdout
    assert "peak memory estimate: not available for strided attention" in proc.stdout


def test_user_mistakes_are_one_line_errors(tmp_path):
    cases = [
        (["finetune/adapter.py", "--model_name", "7B", "--dry_run", "true", "--train.global_batch_size", "6"],
         "not a multiple"),
        (["finetune/lora.py", "--checkpoint_dir", tmp_path / "missing"], "checkpoint directory not found"),
        (["finetune/adapter.py", "--model_name", "8B-typo", "--dry_run", "true"], "unknown model name"),
        (["finetune/adapter.py", "--model_name", "stories260K", "--dry_run", "true", "--adapter.start_layer", "5"],
         "start_layer"),
        (["finetune/full.py", "--model_name", "tiny", "--dry_run", "true", "--quantize", "bnb.nf4"], "QLoRA"),
        (["generate/base.py", "--checkpoint_dir", tmp_path], "tokenizer not found"),
    ]
    for args, message in cases:
        proc = run_script(REPO / args[0], *args[1:])
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, proc.stderr)


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs_for_both_contexts():
    names = {p.name for p in CONFIGS}
    assert {"dolly_comparison_512.yaml", "dolly_comparison_1024.yaml", "smoke_stories260k.yaml"} <= names


# single-run configs and the finetune script each one is for
SINGLE_RUN = {"adapter_v2_dolly_512.yaml": "adapter_v2", "qlora_dolly_1024.yaml": "lora",
              "long_context_stories260k.yaml": "lora"}


# single-run configs of finetune/classify.py <method>, with the model their dry run sizes
CLASSIFY_RUN = {"llama3_mnli_qlora_head.yaml": ("lora", "Llama-3-8B")}


def _classify_dry_run(method: str, cfg: dict, model_name: str, tmp_path: Path, capsys) -> int:
    """The trainable parameters ``finetune/classify.py <method>`` prints for ``cfg`` as a dry run on ``model_name``."""
    from jsonargparse import CLI

    from lit_adapter.train.classification import command

    cell_config = tmp_path / f"classify-{method}.yaml"
    cell_config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "checkpoint_dir"}))
    CLI(command(method), args=["--config", str(cell_config), "--model_name", model_name, "--dry_run", "true"],
        as_positional=False)
    return int(re.search(r"trainable parameters: (\d+)", capsys.readouterr().out).group(1))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path, tmp_path, capsys):
    """Grid files load and every cell's generated config parses in its finetune script (as a dry run on 7B);
    classification configs as finetune/classify.py <method> on their own model (seed 002's trainable counts)."""
    from jsonargparse import CLI

    from lit_adapter.grid import head_study

    raw = yaml.safe_load(path.read_text())
    if head_study.is_head_study(path):  # cells of finetune/classify.py <method>, dry runs on the grid's model
        _, grid = head_study.load_study(path)
        cells = expand(grid)
        model = Config.from_name(grid.checkpoint_dir.name)
        head_study.check_study(grid, cells, model)
        counts = {cell.run.name: _classify_dry_run(cell.run.script, head_study.cell_options(grid, cell), model.name,
                                                    tmp_path, capsys) for cell in cells}
        if path.name == "roberta_mnli_study.yaml":  # seed 002's table: 355 million, 4.6 million, 1.352 million
            assert counts == {"full": 355_362_819, "lora": 4_591_619, "p-tuning": 1_352_963}
        return
    if path.name in CLASSIFY_RUN:
        method, model_name = CLASSIFY_RUN[path.name]
        trainable = _classify_dry_run(method, raw, model_name, tmp_path, capsys)
        assert path.name != "llama3_mnli_qlora_head.yaml" or trainable == 54_538_240  # the seed's "54.6 million"
        return
    if "runs" in raw:
        grid = load_grid(path, extra_keys=("study",))  # the classification study's own section
        expanded = expand(grid)
        cells = [(cell.run.script, run_config(grid, cell, tmp_path / "data", tmp_path / cell.folder_name))
                 for cell in expanded]
        assert len({cell.name for cell in expanded}) == len(cells) >= len(grid.runs) * len(grid.context_lengths)
        # the check run_comparison.py makes before the first cell runs, against the grid's model (by its name)
        checker = CellChecker(Config.from_name(grid.checkpoint_dir.name))
        for (script, cfg), cell in zip(cells, expanded):
            checker.check(script, cfg, cell.name)
        cells = list({cell.group: pair for cell, pair in zip(expanded, cells)}.values())  # one seed of each
    else:
        assert path.name in SINGLE_RUN, f"say which finetune script {path.name} is for"
        cells = [(SINGLE_RUN[path.name], raw)]
    for script, cfg in cells:
        cfg = {k: v for k, v in cfg.items() if k != "checkpoint_dir"}
        cell_config = tmp_path / f"{script}.yaml"
        cell_config.write_text(yaml.safe_dump(cfg))
        CLI(load_setup(script), args=["--config", str(cell_config), "--model_name", "7B", "--dry_run", "true"],
            as_positional=False)
        assert "trainable parameters:" in capsys.readouterr().out


def test_comparison_cells_recognise_every_out_of_memory_message():
    # the CPU allocator's own wording was missed before the marker list was shared with the memory sweep
    for log in ("RuntimeError: [enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                "you tried to allocate 2147483648 bytes.",
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                "OSError: [Errno 12] Cannot allocate memory", "MemoryError"):
        assert classify_failure(1, log) == "OOM", log
    assert classify_failure(-9, "") == "OOM"  # killed by the OOM killer
    assert classify_failure(1, "ValueError: bad config") == "failed"
    assert classify_failure(2, "usage: ...\nerror: train.global_batch_size=6 is not a multiple") == "error"
    assert classify_failure(130, "stopped at step 3") == "interrupted" and classify_failure(None, "") == "timeout"


# Parameters through which a command line writes files, and the top-level folders their defaults may use: out/ for
# outputs, data/ for prepared data (train.pt, ...; --data.data_dir's default), both ignored by .gitignore.
OUTPUT_PARAMETERS = ("out", "out_dir", "out_file", "out_json", "output_dir", "destination_path")
IGNORED_OUTPUT_FOLDERS = ("out", "data")


def test_no_command_writes_outside_ignored_folders_by_default():
    import ast

    ignored = set((REPO / ".gitignore").read_text().split())
    assert {f"/{folder}/" for folder in IGNORED_OUTPUT_FOLDERS} <= ignored
    checked = 0
    for script in sorted([*REPO.glob("scripts/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("evaluate/*.py"),
                          *REPO.glob("generate/*.py")]):
        for node in ast.walk(ast.parse(script.read_text())):
            if not isinstance(node, ast.FunctionDef) or node.name != "main":
                continue
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg not in OUTPUT_PARAMETERS or default is None:
                    continue
                value = ast.literal_eval(default.args[0]) if isinstance(default, ast.Call) else (
                    ast.literal_eval(default))
                assert value is None or Path(value).parts[0] in IGNORED_OUTPUT_FOLDERS, (script.name, arg.arg, value)
                checked += 1
    assert checked >= 4  # compare_generations, memory_sweep, quickstart, the prepare scripts
