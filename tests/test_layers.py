"""The package's layers point down: ARCHITECTURE.md's "Layers" table, checked on the source.

Every ``lark_jax`` import, at module level or inside a function, is an edge from the
importing module to the imported one. An edge may go to a lower layer, or stay inside one
unit (a package such as ``lark_jax.training``, or a top-level module); never up, never to
another unit of the same layer, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lark_jax"


def layer_table(text: str) -> dict[str, int]:
    """Unit name -> layer number, from the fenced block after the "## Layers" heading."""
    section = text.split("\n## Layers", 1)[1]
    block = section.split("```", 2)[1]
    table = {}
    for line in block.strip().splitlines():
        number, *units = line.split()
        for unit in units:
            table[unit] = int(number)
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every lark_jax module the source imports (``from lark_jax import fsio`` is the
    module lark_jax.fsio; a name defined in a package's __init__ is that package)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lark_jax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".")
                pkg = pkg if is_package else pkg[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lark_jax":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _exists(sub) else base)
    return out


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def unit(module: str) -> str:
    """The layered unit of a module: lark_jax.training.trainer -> training; lark_jax -> lark_jax."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lark_jax"


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(f): imports(f.read_text(), module_name(f), f.name == "__init__.py")
            for f in sorted(package.rglob("*.py"))}


def violations(edges: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    bad = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            ua, ub = unit(a), unit(b)
            if ua == ub:
                continue
            for u in (ua, ub):
                if u not in table:
                    bad.append(f"{u} (an end of an import of {a}) is in no layer")
            if ua in table and ub in table and table[ub] >= table[ua]:
                way = "up" if table[ub] > table[ua] else "sideways"
                bad.append(f"{a} (layer {table[ua]}) imports {b} (layer {table[ub]}): {way}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if n == m:
                continue
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return found


def test_imports_follow_the_layers_of_architecture_md():
    table = layer_table((ROOT / "ARCHITECTURE.md").read_text())
    edges = graph()
    assert {unit(m) for m in edges} <= set(table), "a unit of lark_jax is missing from the table"
    assert violations(edges, table) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """On a scratch copy: a model module importing evaluation, and two modules importing
    each other, are both reported (the checks above can fail)."""
    table = layer_table((ROOT / "ARCHITECTURE.md").read_text())
    edges = graph()
    edges["lark_jax.models.decoder"] = edges["lark_jax.models.decoder"] | {
        "lark_jax.evaluation.stops"}
    assert any(re.search(r"lark_jax\.models\.decoder .* imports lark_jax\.evaluation\.stops"
                         r" .*: up", v) for v in violations(edges, table))
    edges["lark_jax.models.params"] = edges["lark_jax.models.params"] | {
        "lark_jax.models.decoder"}
    assert any({"lark_jax.models.params", "lark_jax.models.decoder"} <= set(c)
               for c in cycles(edges))
    src = "from lark_jax.evaluation import stops\nfrom . import attention\n"
    assert imports(src, "lark_jax.models.decoder", False) == {"lark_jax.evaluation.stops",
                                                             "lark_jax.models.attention"}
