"""The package's shape: no import cycle (counting imports inside functions too), no oversized module, and one
method registry that nothing outside the method modules branches around."""

import ast
import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

from lit_adapter.tuners.registry import METHODS, REGISTRY
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.tuners import base as tuners_base
from lit_adapter.tuners.base import Method

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lit_adapter"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}


def import_graph() -> Dict[str, Set[str]]:
    """Edges module -> package module it imports, from every import statement (also those inside functions).

    ``from a.b import c`` names the module ``a.b.c`` when that is a module, else ``a.b``; a submodule's implicit
    import of its parent package is Python's mechanics, not a dependency, and is not counted.
    """
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # ``import a.b.c`` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    # lit_adapter.tuners.registry imports the checkpoint helpers at the top, and the tuners package inside
    # discover_methods; nothing imports the loop lazily from them
    assert {"lit_adapter.tuners", "lit_adapter.checkpoint"} <= graph["lit_adapter.tuners.registry"]
    # training imports the estimator, which imports the losses, not the loop
    assert "lit_adapter.memory.estimate" in graph["lit_adapter.train.run"]
    assert "lit_adapter.train.losses" in graph["lit_adapter.memory.estimate"]


def test_the_registry_is_every_method_its_modules_define():
    """Adding a method is writing its module: the registry finds it (no list to extend), and it has its command."""
    from lit_adapter.tuners.registry import discover_methods

    defined = set()
    for path in sorted((PACKAGE / "tuners").glob("*.py")):
        module = __import__(f"lit_adapter.tuners.{path.stem}", fromlist=["_"])
        defined |= {v.name for v in vars(module).values() if isinstance(v, Method)}
    assert set(discover_methods()) == set(REGISTRY) == defined
    commands = {p.stem for p in (REPO / "finetune").glob("*.py")} - {"classify", "dpo"}
    assert commands == defined


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_no_module_is_oversized():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_nothing_outside_the_method_modules_branches_on_a_method_name():
    names = "|".join(re.escape(m) for m in METHODS)
    branch = re.compile(rf"""(\.method|method)\s*(==|!=|in)\s*\(?\s*["']({names})["']""")
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / d for d in ("finetune", "scripts")) ]:
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for f in files:
            if "tuners" in f.parts:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if branch.search(line):
                    offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("name", METHODS)
def test_every_registered_method_declares_what_the_package_asks(name):
    method = REGISTRY[name]
    assert isinstance(method, Method) and method.name == name
    assert method.summary and "(" in method.summary, "the summary cites the paper"
    module = type(method).__module__
    assert module.startswith("lit_adapter.tuners."), module
    doc = __import__(module, fromlist=["_"]).__doc__
    assert doc and len(doc.splitlines()) >= 3, "a method module opens with the paper and what it does"
    settings = method.default_settings()
    if method.settings_cls is not None:
        assert dataclasses.is_dataclass(settings) and method.settings_group
    assert isinstance(method.memory_terms(settings), MemoryTerms)
    assert (REPO / "finetune" / f"{name}.py").is_file()
    assert {"learning_rate"} <= set(method.train_defaults)


def _tuner_classes():
    """Every ``nn.Module`` subclass defined in a module under ``lit_adapter/tuners/``."""
    import importlib
    import inspect

    import torch.nn as nn

    classes = []
    for name in sorted(n for n in _modules() if n.startswith("lit_adapter.tuners.")):
        module = importlib.import_module(name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if c.__module__ == name and issubclass(c, nn.Module)]
    return classes


def test_no_tuner_subclasses_the_model():
    """Methods attach to a plain GPT, by wrapping a linear or in the model's hook slots: none replaces the model's
    own classes (no subclass of GPT, Block or CausalSelfAttention, so no copied forward)."""
    from lit_adapter.model.gpt import GPT, Block, CausalSelfAttention

    classes = _tuner_classes()
    assert classes, "the tuner modules define their layers"
    assert [c.__qualname__ for c in classes if issubclass(c, (GPT, Block, CausalSelfAttention))] == []


@pytest.mark.parametrize("name", METHODS)
def test_every_module_a_method_adds_that_holds_tensors_is_a_tuner_layer(name):
    """Built the public way (``methods.build_model`` on meta), every module of a tuner class that holds tensors of
    its own is a ``TunerLayer``, and every tensor the method adds lives in one: the switch and the initialiser are
    found by type, never by name."""
    import torch

    from lit_adapter.model.config import Config
    from lit_adapter.tuners.registry import MethodSpec, build_model
    from lit_adapter.tuners.base import TunerLayer

    spec = MethodSpec(name)
    if hasattr(spec.settings, "start_layer"):
        spec.settings.start_layer = 1  # the tiny model has 2 layers
    with torch.device("meta"):
        model = build_model(spec, Config.from_name("tiny"))
    tuner_classes = set(_tuner_classes())
    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, TunerLayer):
            owners.update({id(t): module_name for _, _, t in module.own_tensors()})
        elif type(module) in tuner_classes:
            assert not list(module.parameters()) and not list(module.buffers()), (
                f"{module_name} ({type(module).__name__}) holds tensors but is no TunerLayer")
    added = [n for n, p in model.named_parameters() if spec.definition.is_added(n)]
    assert [n for n, p in model.named_parameters() if spec.definition.is_added(n) and id(p) not in owners] == []
    assert bool(added) == (name != "full")  # every method but full fine-tuning adds tensors


def test_every_tuner_layer_says_how_its_tensors_start():
    from lit_adapter.tuners.base import TunerLayer

    abstract = ("TunerLayer", "LinearWrapper", "VirtualTokens")
    for cls in _tuner_classes():
        if issubclass(cls, TunerLayer) and cls.__name__ not in abstract:
            assert cls.reset_peft_parameters is not TunerLayer.reset_peft_parameters, cls.__qualname__
# A method's name or one of its terms, alone or as the start of an identifier (``lora_r``, ``v2_linears``), as it
# would appear in code or prose; ``lit_adapter`` (the package) is removed first. Whole words only, so generic
# words that merely contain one ("adaptive", "promptly") pass.
_METHOD_WORDS = re.compile(
    r"\b(lora|q?dora|ia3|ia³|bitfit|bottleneck|houlsby|pfeiffer|prefix(es)?|prompts?|adapters?|llama-adapter|v2|"
    r"virtual|p-tuning|full fine-tuning|scale_bias)(_\w+)?\b", re.IGNORECASE)
# measure.py is the measurement harness: its ``Cell`` names the method to measure, as data
_ESTIMATOR = [p for p in sorted((PACKAGE / "memory").glob("*.py")) if p.name != "measure.py"]


def test_the_memory_estimator_names_no_method_and_trained_parts_is_gone():
    """The estimator asks each method's MemoryTerms; none of its modules names a method or a method's term."""
    offenders = []
    for path in _ESTIMATOR:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            match = _METHOD_WORDS.search(line.replace("lit_adapter", ""))
            if match:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {match.group(0)!r} in {line.strip()}")
    assert offenders == []
    assert len(_ESTIMATOR) >= 5 and not _METHOD_WORDS.search("the head's weight trains; SDPA keeps q, k, v")
    assert _METHOD_WORDS.search("t.v2_linears") and _METHOD_WORDS.search("lora_r")
    # the per-method fields of the old ``TrainedParts`` are gone: the base terms hold only generic facts
    assert not hasattr(tuners_base, "TrainedParts")
    fields = {f.name for f in dataclasses.fields(MemoryTerms)}
    assert fields == {"norms", "base_linears", "embedding"}


# --- the layout by responsibility (issue 22) ---------------------------------------------------------------------

PROTOCOL_MODULES = {"lit_adapter.tuners.base", "lit_adapter.tuners.wrapping", "lit_adapter.tuners.registry"}
"""What the rest of the package may know of the methods: the protocol and the registry, not a method module."""


def _tuner_class_names() -> Set[str]:
    """Classes defined by the method modules (not the protocol's): no module outside tuners/ may name one."""
    names = set()
    for name, path in _modules().items():
        if name.startswith("lit_adapter.tuners.") and name not in PROTOCOL_MODULES:
            names |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    return names


def _outside_tuners() -> Dict[str, Path]:
    return {n: p for n, p in _modules().items() if not n.startswith("lit_adapter.tuners")}


def test_no_module_outside_tuners_names_a_tuner_class_or_a_method():
    classes, methods = _tuner_class_names(), set(METHODS)
    offenders = []
    for name, path in _outside_tuners().items():
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_adapter.tuners"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                modules = [t for t in targets if t in _modules() and t != "lit_adapter.tuners"]
                if any(t not in PROTOCOL_MODULES for t in modules):
                    offenders.append(f"{where}: imports {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{where}: imports {a.name}" for a in node.names
                              if a.name.startswith("lit_adapter.tuners.") and a.name not in PROTOCOL_MODULES]
            elif isinstance(node, ast.Name) and node.id in classes:
                offenders.append(f"{where}: names {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in classes:
                offenders.append(f"{where}: names {node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in methods:
                offenders.append(f"{where}: names the method {node.value!r}")
    assert offenders == [], "\n".join(offenders)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases: Dict[str, str] = {}  # a local name bound to a package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_adapter"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in modules:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and node.module != name:
                        offenders.append(f"{name}:{node.lineno}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("lit_adapter")})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offenders == [], "\n".join(offenders)


def test_the_top_level_holds_subpackages_and_a_few_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 8, top
    assert {"model", "tuners", "data", "train", "tracking", "generation", "evaluation", "grid", "convert", "export",
            "memory", "cli"} <= set(packages)


def test_every_package_and_module_says_what_it_is_for():
    undocumented = [name for name, path in _modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert undocumented == []


_DOC_PATH = re.compile(r"(?<![\w./-])((?:lit_adapter|scripts|finetune|generate|evaluate|benchmarks|configs|tests|docs)"
                       r"/[\w./-]*\w)(?![\w<*])")
_DOC_MODULE = re.compile(r"(?<![\w./])lit_adapter((?:\.\w+)+)")


def test_every_path_and_module_the_readme_and_docs_name_exists():
    """A path (``lit_adapter/train/trainer.py``) or a dotted name (``lit_adapter.memory.estimate``) in the README
    or docs/ names something that is there: the module path at least as far as it goes into the package."""
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        missing += [f"{doc.name}: {m.group(1)}" for m in _DOC_PATH.finditer(text) if not (REPO / m.group(1)).exists()]
        for m in _DOC_MODULE.finditer(text):
            parts = m.group(1).strip(".").split(".")
            if not ((PACKAGE / parts[0]).is_dir() or (PACKAGE / f"{parts[0]}.py").is_file()):
                missing.append(f"{doc.name}: lit_adapter.{m.group(1).strip('.')}")
            elif len(parts) > 1 and (PACKAGE / parts[0]).is_dir() and not (
                    (PACKAGE / parts[0] / parts[1]).is_dir() or (PACKAGE / parts[0] / f"{parts[1]}.py").is_file()
                    or parts[1] in (PACKAGE / parts[0] / "__init__.py").read_text()):
                missing.append(f"{doc.name}: lit_adapter.{m.group(1).strip('.')}")
    assert missing == [], "\n".join(missing)
