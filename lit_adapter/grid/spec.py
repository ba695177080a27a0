"""What a comparison grid is: its file, the command-line overrides of it, and its expansion into named cells.

A grid expands runs (a method and its settings) x attention x base quantization x context length x seed. Every
axis is a top-level list of the grid file, and a run may restrict any of them to a subset (LoRA only at full
precision, QLoRA only on the 4-bit base)::

    name: dolly-512                                  # the WandB group and the results' title (default: file name)
    quantize: [none, bnb.int8, bnb.nf4]              # none: the base at the fabric precision
    attention: {dense: {}, sparse: {pattern: shifted, group_size_ratio: 0.25}}
    context_lengths: [512]
    seeds: [1337, 1338]                              # default: common.train.seed
    common: {train: {...}, eval: {...}}              # every cell's options
    runs:
      - {name: adapter_v2, script: adapter_v2}
      - {name: qlora, script: lora, quantize: [bnb.nf4], attention: [dense], args: {lora: {r: 8}}}

A cell is named ``<run>[+<attention>]/<base>[/<context>]/s<seed>`` (``adapter_v2+sparse/nf4/s1337``): the attention
label is left out for ``dense``, the context when the grid has one, and ``<base>`` is the quantization without its
``bnb.`` prefix, or the precision (``bf16``, ``fp32``) of an unquantized base.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import METHODS
from lit_adapter.model.quantize import QUANTIZE_MODES

GRID_KEYS = ("name", "checkpoint_dir", "out_dir", "data", "context_lengths", "quantize", "attention", "seeds",
             "common", "runs")
RUN_KEYS = ("name", "script", "args", "quantize", "attention", "seeds")
DENSE = "dense"
# Grid `data` keys that are the grid's to set per context, not prepare()'s options
_PREPARE_FIXED = ("destination_path", "tokenizer_path", "max_seq_length", "progress", "log")
_PRECISION_LABELS = {"bf16-true": "bf16", "32-true": "fp32", "16-true": "fp16", "32": "fp32", "bf16-mixed": "bf16mix",
                     "16-mixed": "fp16mix", "64-true": "fp64"}


@dataclass
class GridRun:
    name: str
    script: str
    args: Dict[str, Any] = field(default_factory=dict)
    quantize: Optional[List[Optional[str]]] = None
    """The grid's quantize values this run takes (None: all)."""
    attention: Optional[List[str]] = None
    seeds: Optional[List[int]] = None


@dataclass
class Grid:
    checkpoint_dir: Path
    out_dir: Path
    data: Dict[str, Any]
    context_lengths: List[int]
    runs: List[GridRun]
    common: Dict[str, Any] = field(default_factory=dict)
    name: str = "comparison"
    quantize: List[Optional[str]] = field(default_factory=lambda: [None])
    """Base quantization modes; None is the unquantized base."""
    attention: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {DENSE: {}})
    seeds: List[Optional[int]] = field(default_factory=lambda: [None])
    """None: the seed the cell's config sets (``train.seed``)."""


@dataclass
class Cell:
    """One fine-tuning run of the grid."""

    run: GridRun
    attention: str
    quantize: Optional[str]
    context: int
    seed: int
    name: str
    group: str
    """The name without the seed: the seeds of one group are averaged in the table."""
    attention_tag: str = DENSE
    """What the tables and WandB tags call the cell's attention: its axis label, or for a run that sets
    ``attention`` in its own args, the pattern."""

    @property
    def folder_name(self) -> str:
        return self.name.replace("/", "-")

    def axes(self) -> Dict[str, Any]:
        return {"name": self.name, "group": self.group, "run": self.run.name, "method": self.run.script,
                "attention": self.attention_tag, "quantize": self.quantize or "none", "context": self.context,
                "seed": self.seed}


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(tokens: Sequence[str]) -> Dict[str, Any]:
    """``--common.train.learning_rate 3e-3`` / ``--seeds=[1,2]`` tokens as a nested mapping of grid keys (values
    parsed as YAML). A cell option group given without ``common.`` (``--train.max_steps 10``) goes to every cell."""
    from lit_adapter.grid.validation import cell_option_groups

    overrides: Dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) == 2:
            raise UserError(f"unexpected argument {token!r}; grid overrides read --<key>[.<key>...] <value>")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if not tokens:
                raise UserError(f"--{key} needs a value")
            value = tokens.pop(0)
        path = key.split(".")
        if path[0] not in GRID_KEYS:
            if path[0] not in cell_option_groups():
                raise UserError(f"unknown option --{key}; grid options: {', '.join('--' + k for k in GRID_KEYS)} "
                                "(--common.<group>.<option> sets an option of every cell)")
            path = ["common"] + path
        parsed = _parse_value(value)
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--{key} overrides a value given by another option")
        node[path[-1]] = parsed
    return overrides


def _parse_value(value: str) -> Any:
    # JSON first: YAML 1.1 reads 3e-3 as a string
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _quantize_value(value: Any, where: str) -> Optional[str]:
    if value is None or value == "none":
        return None
    if value not in QUANTIZE_MODES:
        raise UserError(f"{where}: unknown quantize {value!r}; choose from none, {', '.join(QUANTIZE_MODES)}")
    return value


def _list(raw: Any, key: str, where: str) -> List[Any]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: {key} must be a non-empty list, got {raw!r}")
    return raw


def load_grid(path: Path, overrides: Optional[Dict[str, Any]] = None, extra_keys: Sequence[str] = ()) -> Grid:
    """The grid in ``path`` with ``overrides`` (:func:`parse_overrides`) merged in; ``extra_keys`` are top-level
    keys that belong to the caller (the classification study's ``study``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    raw = deep_merge(raw, overrides or {})
    unknown = [k for k in raw if k not in GRID_KEYS and k not in extra_keys]
    if unknown:
        raise UserError(f"{path}: unknown grid key {unknown[0]!r}; the grid's keys are {', '.join(GRID_KEYS)}")
    missing = [k for k in ("checkpoint_dir", "out_dir", "data", "context_lengths", "runs") if k not in raw]
    if missing:
        raise UserError(f"{path} misses {', '.join(missing)}")
    common = raw.get("common") or {}
    if not isinstance(common, dict):
        raise UserError(f"{path}: common must be a mapping of cell options")
    if "quantize" in raw:
        quantize = [_quantize_value(q, str(path)) for q in _list(raw["quantize"], "quantize", str(path))]
    else:  # a grid without the axis: the base the common options load
        quantize = [_quantize_value(common.get("quantize"), str(path))]
    attention = raw.get("attention") or {DENSE: {}}
    if not isinstance(attention, dict) or not all(isinstance(v, dict) or v is None for v in attention.values()):
        raise UserError(f"{path}: attention must map labels to attention options, e.g. {{dense: {{}}, sparse: "
                        "{pattern: shifted}}")
    attention = {str(k): v or {} for k, v in attention.items()}
    seeds = [None] if raw.get("seeds") is None else _list(raw["seeds"], "seeds", str(path))
    if not all(s is None or isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: seeds must be distinct integers, got {seeds}")
    runs = [_load_run(path, i, run, quantize, attention, seeds) for i, run in enumerate(raw["runs"] or [])]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: run names must be unique, got {names}")
    _check_data_settings(path, raw["data"])
    contexts = [int(c) for c in _list(raw["context_lengths"], "context_lengths", str(path))]
    if any(c < 8 for c in contexts):
        raise UserError(f"{path}: context_lengths must be lengths >= 8")
    return Grid(Path(raw["checkpoint_dir"]), Path(raw["out_dir"]), raw["data"], contexts, runs, common,
                str(raw.get("name") or path.stem), quantize, attention, seeds)


def _load_run(path: Path, i: int, run: Any, quantize, attention, seeds) -> GridRun:
    where = f"{path}: runs[{i}]"
    if not isinstance(run, dict) or "name" not in run or "script" not in run:
        raise UserError(f"{where} needs a name and a script")
    where = f"{path}: run {run['name']!r}"
    unknown = [k for k in run if k not in RUN_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a run has {', '.join(RUN_KEYS)}")
    if run["script"] not in METHODS:  # every registered method has its finetune/<method>.py
        raise UserError(f"{where}: script={run['script']!r}; choose one of {', '.join(METHODS)}")
    if "/" in str(run["name"]):
        raise UserError(f"{where}: a run name cannot hold '/' (it separates the parts of a cell's name)")
    subsets = {}
    for key, allowed in (("quantize", quantize), ("attention", list(attention)), ("seeds", seeds)):
        if run.get(key) is None:
            continue
        values = _list(run[key], key, where)
        if key == "quantize":
            values = [_quantize_value(v, where) for v in values]
        missing = [v for v in values if v not in allowed]
        if missing:
            raise UserError(f"{where}: {key} {missing[0] or 'none'!r} is not one of the grid's {key} "
                            f"({', '.join(str(a or 'none') for a in allowed)})")
        subsets[key] = values
    return GridRun(str(run["name"]), run["script"], run.get("args") or {}, **subsets)


def _check_data_settings(path: Path, data: Any) -> None:
    from lit_adapter.data.instructions import prepare

    if not isinstance(data, dict):
        raise UserError(f"{path}: data must be a mapping of prepare options (source, val_size, ...)")
    allowed = [name for name in inspect.signature(prepare).parameters if name not in _PREPARE_FIXED]
    for key in data:
        if key not in allowed:
            raise UserError(f"{path}: unknown data option {key!r}; the data options are {', '.join(allowed)}"
                            + (" (max_seq_length comes from context_lengths)" if key == "max_seq_length" else ""))


def base_label(quantize: Optional[str], cell_options: Dict[str, Any]) -> str:
    if quantize:
        return quantize.replace("bnb.", "")
    precision = (cell_options.get("fabric") or {}).get("precision")
    return _PRECISION_LABELS.get(str(precision), str(precision).replace("-", "")) if precision else "none"


def options_of(grid: Grid, run: GridRun, attention: str, quantize: Optional[str], seed: Optional[int]) -> Dict:
    """A cell's finetune options before its paths: common, the run's own, then the cell's axes."""
    cfg = deep_merge(grid.common, run.args)
    axes: Dict[str, Any] = {"quantize": quantize}
    if grid.attention[attention] or attention != DENSE:
        axes["attention"] = grid.attention[attention]
    if seed is not None:
        axes["train"] = {"seed": seed}
    return deep_merge(cfg, axes)


def expand(grid: Grid) -> List[Cell]:
    """Every cell of the grid, context by context, in the order of the runs."""
    from lit_adapter.train.run import TrainArgs

    cells = []
    for context in grid.context_lengths:
        for run in grid.runs:
            for attention in run.attention or list(grid.attention):
                for quantize in run.quantize or grid.quantize:
                    for seed in run.seeds or grid.seeds:
                        options = options_of(grid, run, attention, quantize, seed)
                        seed_used = (options.get("train") or {}).get("seed", TrainArgs.seed)
                        group = run.name + ("" if attention == DENSE else f"+{attention}")
                        group += f"/{base_label(quantize, options)}"
                        if len(grid.context_lengths) > 1:
                            group += f"/{context}"
                        # a run that sets its attention in its args (older grid files) is tagged with its pattern
                        kind = attention if attention != DENSE else (options.get("attention") or {}).get(
                            "pattern", DENSE)
                        cells.append(Cell(run, attention, quantize, context, seed_used, f"{group}/s{seed_used}",
                                          group, kind))
    return cells


def select(cells: List[Cell], only: Optional[List[str]]) -> List[Cell]:
    """The cells named by ``only``: a cell's name, its group (all its seeds), its run's name, or a shell pattern
    of names (``'adapter*/nf4/*'``)."""
    if not cells:
        raise UserError("the grid has no cells (no runs)")
    if not only:
        return cells

    def matches(cell: Cell, pattern: str) -> bool:
        return pattern in (cell.name, cell.group, cell.run.name) or fnmatch.fnmatchcase(cell.name, pattern)

    unmatched = [p for p in only if not any(matches(c, p) for c in cells)]
    if unmatched:
        shown = ", ".join(c.name for c in cells[:12]) + (", ..." if len(cells) > 12 else "")
        raise UserError(f"--only {', '.join(map(repr, unmatched))} matches no cell of the grid; its cells are "
                        f"{shown} (--print_cells lists them)")
    return [c for c in cells if any(matches(c, p) for p in only)]
