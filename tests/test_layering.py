"""The package's layers point one way (docs/design.md section 3 draws them).

Every ``import`` and ``from ... import`` statement of every module of kasa_trl is read with ``ast``: at module
level, inside functions, and under ``if TYPE_CHECKING:`` (those count too: an annotation naming a higher layer's
type is a dependency on that layer, and nothing stops it from becoming a real import later). Each must go to a
module of the same layer or a lower one (``LAYERS``); together they must form no cycle; and no module may take a
private ``_name`` from another (a shared helper gets a public name, in a private module if it is not API).
Private *modules* (``_symeig``) are imported by their public names.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kasa_trl

PACKAGE = Path(kasa_trl.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"

# Layer of each module, bottom (0) to top. A module may import its own layer and the ones below.
LAYERS = {
    # 0 foundations: pure math on tensors, the config as data, file utilities (standard library only).
    "kasa_trl._lapack": 0,
    "kasa_trl._symeig": 0,
    "kasa_trl.decomposition": 0,
    "kasa_trl.factors": 0,
    "kasa_trl.stacked": 0,
    "kasa_trl.fingerprint": 0,
    "kasa_trl.regularizers": 0,
    "kasa_trl.config": 0,
    "kasa_trl.peft_compat": 0,
    "kasa_trl.atomic_files": 0,
    "kasa_trl.atomic_outputs": 0,
    "kasa_trl.spectrum_plots": 0,
    # 0, standalone: helpers for examples and tests that import no other kasa_trl module.
    "kasa_trl.tiny": 0,
    "kasa_trl.torch_extensions": 0,
    "kasa_trl.data": 0,
    "kasa_trl.data.make_data": 0,
    # 1 weight access and ZeRO primitives: the (out, in) view of a weight, gathers, partitions, ranks.
    "kasa_trl.distributed": 1,
    "kasa_trl.weights": 1,
    "kasa_trl.quantized": 1,
    # 2 the layer.
    "kasa_trl.layer": 2,
    # 3 model-level operations: choosing targets, decomposing them, putting layers in and out, adapter files.
    "kasa_trl.targets": 3,
    "kasa_trl.shared_weights": 3,
    "kasa_trl.target_decomposition": 3,
    "kasa_trl.model": 3,
    "kasa_trl.unloading": 3,
    "kasa_trl.adapter_format": 3,
    "kasa_trl.adapter_files": 3,
    "kasa_trl.adapter_io": 3,
    # 4 training: the trainers and what they use, the callbacks.
    "kasa_trl.penalty": 4,
    "kasa_trl.regularization": 4,
    "kasa_trl.quantized_training": 4,
    "kasa_trl.training_guards": 4,
    "kasa_trl.checkpoint": 4,
    "kasa_trl.trainer": 4,
    "kasa_trl.dpo_trainer": 4,
    "kasa_trl.callbacks": 4,
    # 5 integrations with other tools.
    "kasa_trl.integrations": 5,
    "kasa_trl.integrations.peft": 5,
    "kasa_trl.integrations.peft._peft_format": 5,
    "kasa_trl.integrations.peft._source": 5,
    "kasa_trl.integrations.peft.kasa_format": 5,
    "kasa_trl.integrations.peft.lora_export": 5,
    # 6 the command line.
    "kasa_trl.cli": 6,
    "kasa_trl.inspect_report": 6,
    # 7 the package itself: its lazy exports name every layer; no module imports names from it.
    "kasa_trl": 7,
}


@dataclass(frozen=True)
class Import:
    """One imported kasa_trl module: ``source`` imports ``target`` (taking ``names`` from it) at ``line``."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{self.source}:{self.line}: {what}"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def kasa_imports(source: str, tree: ast.Module, is_package: bool, modules: set[str]) -> Iterator[Import]:
    """Every import of a kasa_trl module in ``tree`` (the whole tree: functions and TYPE_CHECKING blocks too).
    ``from package import name`` counts as importing the submodule ``package.name`` where there is one."""
    package = source if is_package else source.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kasa_trl":
                    yield Import(source, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kasa_trl":
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    yield Import(source, f"{target}.{alias.name}", (), node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(source, target, tuple(names), node.lineno)


def private_attributes(tree: ast.Module, aliases: dict[str, str]) -> Iterator[tuple[str, str, int]]:
    """``(module, attribute, line)`` for each ``alias._name`` where ``alias`` names an imported kasa_trl module."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield aliases[node.value.id], node.attr, node.lineno


def module_aliases(tree: ast.Module, source: str, is_package: bool, modules: set[str]) -> dict[str, str]:
    """Local names bound to kasa_trl modules (``from . import _symeig``, ``import kasa_trl.model as m``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            for found in kasa_imports(source, ast.Module(body=[node], type_ignores=[]), is_package, modules):
                if not found.names:
                    for alias in node.names:
                        if found.target.endswith("." + alias.name):
                            aliases[alias.asname or alias.name] = found.target
    return aliases


def layering_problems(files: dict[str, Path], layers: dict[str, int]) -> list[str]:
    """Everything that breaks the rules, one line each (empty when the layers point one way)."""
    modules = set(files)
    problems = [f"{name}: a module missing from LAYERS" for name in sorted(modules - set(layers))]
    problems += [f"{name}: in LAYERS but no such module" for name in sorted(set(layers) - modules)]
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for source, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for found in kasa_imports(source, tree, is_package, modules):
            if found.target == source:
                continue
            if found.target not in modules:
                problems.append(f"{found}: imports {found.target}, which is not a module of the package")
                continue
            if source in layers and found.target in layers and layers[found.target] > layers[source]:
                problems.append(
                    f"{found}: upward import (layer {layers[source]} imports layer {layers[found.target]})"
                )
            private = [name for name in found.names if name.startswith("_") and not name.startswith("__")]
            if private:
                problems.append(f"{found}: imports the private {', '.join(private)} of another module")
            graph[source].add(found.target)
        aliases = module_aliases(tree, source, is_package, modules)
        for target, attribute, line in private_attributes(tree, aliases):
            problems.append(f"{source}:{line}: uses the private {target}.{attribute} of another module")
    problems += [f"import cycle among {', '.join(component)}" for component in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or with an edge to itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_layers_point_one_way():
    problems = layering_problems(module_files(), LAYERS)
    assert not problems, "\n".join(problems)


def test_the_check_catches_each_kind_of_problem(tmp_path):
    """The checker on a made-up package: an upward import inside a function, a TYPE_CHECKING import, a cycle,
    a private name and a private attribute are each reported; the clean modules are not."""
    root = tmp_path / "kasa_trl"
    (root / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "low.py": "def f():\n    from .high import g\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kasa_trl.high import g\n",
        "a.py": "from . import b\n",
        "b.py": "import kasa_trl.a\n",
        "high.py": "from .low import _helper\nfrom . import low\nlow._secret()\nfrom .sub import leaf\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from .. import typed\nfrom ..low import f\n",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    layers = {
        "kasa_trl": 9,
        "kasa_trl.low": 0,
        "kasa_trl.typed": 0,
        "kasa_trl.a": 0,
        "kasa_trl.b": 0,
        "kasa_trl.high": 1,
        "kasa_trl.sub": 1,
        "kasa_trl.sub.leaf": 1,
    }
    problems = layering_problems(module_files(root), layers)
    expected = [
        "kasa_trl.low:2: from kasa_trl.high import g: upward import",
        "kasa_trl.typed:3: from kasa_trl.high import g: upward import",
        "kasa_trl.high:1: from kasa_trl.low import _helper: imports the private _helper",
        "kasa_trl.high:3: uses the private kasa_trl.low._secret",
        "import cycle among kasa_trl.a, kasa_trl.b",
        "import cycle among kasa_trl.high, kasa_trl.low",
    ]
    for line in expected:
        assert any(problem.startswith(line) for problem in problems), (line, problems)
    assert len(problems) == len(expected), problems
    # A module missing from the table, a table entry without a module, an import of a module that is not there.
    (root / "sub" / "leaf.py").write_text("from kasa_trl import nowhere\n")
    layers = {name: layer for name, layer in layers.items() if name != "kasa_trl.sub.leaf"}
    problems = layering_problems(module_files(root), {**layers, "kasa_trl.gone": 0})
    assert "kasa_trl.sub.leaf: a module missing from LAYERS" in problems
    assert "kasa_trl.gone: in LAYERS but no such module" in problems


def test_the_design_doc_draws_every_module():
    """docs/design.md section 3 draws the layers; every module of the table is named there."""
    if not DESIGN.is_file():
        pytest.skip(f"{DESIGN} is not in this checkout")
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## 3. Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name in LAYERS
        if name != "kasa_trl" and name.removeprefix("kasa_trl.").rsplit(".", 1)[-1] not in section
    ]
    assert not missing, f"docs/design.md section 3 does not name {missing}"
