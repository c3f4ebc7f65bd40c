"""The library's layers (docs/architecture.md): no module imports a layer above its own, not even inside a
function, there is no import cycle, and the harness and decisions reach the method only through the core's
scoring path (never a stage module directly)."""
from __future__ import annotations

import ast
from pathlib import Path

import fiseclip_lib

PACKAGE = Path(fiseclip_lib.__file__).parent
RANK = {"errors": 0, "version": 0, "methods": 1, "config": 1, "features": 1, "plumbing": 2, "encoder": 3, "core": 4,
        "evaluation": 5, "decisions": 6, "notebook": 7, "integrations": 8, "cli": 9, "__main__": 9, "__init__": 10}
STAGES = {"fiseclip_lib.core.text", "fiseclip_lib.core.filtering", "fiseclip_lib.core.matching",
          "fiseclip_lib.core.fusion", "fiseclip_lib.encoder.restore", "fiseclip_lib.core._match_kernel"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def canonical(name: str) -> str:
    """Old module paths (fiseclip_lib.MOVED) name their new modules."""
    short = name[len("fiseclip_lib."):]
    return f"fiseclip_lib.{fiseclip_lib.MOVED[short]}" if short in fiseclip_lib.MOVED else name


def imports() -> dict[str, set[str]]:
    """Every library module -> the library modules it imports, anywhere in its body (absolute names; old paths
    mapped to their modules; `importlib.import_module("...")` with a literal name counts too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("fiseclip_lib"):
                    continue
                for alias in node.names:  # `from pkg import module` imports the module
                    sub = canonical(f"{base}.{alias.name}")
                    found.add(sub if sub in modules else canonical(base))
            elif isinstance(node, ast.Import):
                found.update(canonical(a.name) for a in node.names if a.name.startswith("fiseclip_lib"))
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
                  ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                  and str(node.args[0].value).startswith("fiseclip_lib")):
                found.add(canonical(node.args[0].value))
        unknown = {m for m in found if m not in modules}
        assert not unknown, f"{name} imports {sorted(unknown)}, which is no module of the library"
        graph[name] = {m for m in found if m != name}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"{m} -> {t}" for m, ts in imports().items() for t in ts
           if layer(m) != "__init__" and RANK[layer(t)] > RANK[layer(m)]]
    assert not bad, "imports of a higher layer: " + "; ".join(sorted(bad))


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, trail):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1 and not cycle:
                cycle.extend(trail[trail.index(t):] + [t])
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, " -> ".join(cycle)


def test_harness_and_decisions_use_the_scoring_core_not_the_stages():
    bad = [f"{m} -> {t}" for m, ts in imports().items() for t in ts
           if layer(m) in ("evaluation", "decisions") and t in STAGES]
    assert not bad, "; ".join(sorted(bad))


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # the graph must include function-level imports: the layer rule covers them too
    graph = imports()
    assert "fiseclip_lib.plumbing.images" in graph["fiseclip_lib.encoder.preprocess"]


def test_old_module_paths_are_the_new_modules_and_reload_as_them():
    import importlib

    import fiseclip_lib.core.fusion as new
    import fiseclip_lib.fusion as old

    assert old is new and new.__spec__.name == "fiseclip_lib.core.fusion"
    assert importlib.reload(old) is new and new.__name__ == "fiseclip_lib.core.fusion"
