"""The package's shape: no import cycle, config as a leaf, every third-party import declared."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "geoseg"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (a lazy import is still an edge)."""
    found = set()
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {t for t in imports_of(path) if t in modules and t != name}
        # Importing geoseg.x.y imports its packages too; the package's lazy public API is not an edge.
        edges[name] = {t for t in targets if t != "geoseg"}
    return edges


def test_no_import_cycle_among_geoseg_modules():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_config_is_a_leaf():
    """geoseg.config imports no runtime module: only errors and the value modules classes and registry."""
    allowed = {"geoseg.errors", "geoseg.classes", "geoseg.registry"}
    for name, targets in graph().items():
        if name.startswith("geoseg.config"):
            bad = {t for t in targets if not t.startswith("geoseg.config") and t not in allowed}
            assert not bad, f"{name} imports {bad}"


def test_every_third_party_import_is_a_declared_dependency():
    """`pip install geoseg` without extras must be enough for every module-level import and the shipped pipeline.

    Imports that only some features need are declared in the extra that serves them.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        import re

        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    declared = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    #: module -> the extra that declares it (imported only by the feature that needs it, with a clear error)
    optional = {"dask_jobqueue": "slurm", "pyarrow": "parquet", "bokeh": "dashboard", "onnx": "onnx",
                "onnxruntime": "onnx"}  # each imported where its feature is used, with an error naming the extra
    dist_of = packages_distributions()
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for target in imports_of(path):
            top = target.split(".")[0]
            if not top or top == "geoseg" or top in sys.stdlib_module_names or top == "__future__":
                continue
            dists = {d.lower().replace("_", "-") for d in dist_of.get(top, [top])}
            if top in optional:
                assert dists & extras.get(optional[top], set()), f"{top} (in {path.name}) not in extra {optional[top]}"
            elif not dists & declared:
                missing.append(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in [project.dependencies]: {sorted(set(missing))}"


def test_psutil_is_not_a_runtime_dependency():
    """psutil serves the benchmarks and tests only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(r.startswith("psutil") for r in project["dependencies"])
    assert any(r.startswith("psutil") for r in project["optional-dependencies"]["bench"])


def test_every_script_the_docs_and_configs_name_exists():
    """A command shown in a config, a doc or the README names a file of this checkout."""
    import re

    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.y*ml")),
             *sorted((ROOT / "pipelines").glob("*.yaml")), *sorted((ROOT / "configs" / "nightly").glob("*"))]
    missing = []
    for text in texts:
        for name in re.findall(r"\b((?:benchmarks|configs|pipelines)/[\w./-]+\.(?:py|yaml|sh|sbatch))\b",
                               text.read_text()):
            if not (ROOT / name).exists():
                missing.append(f"{name} (named in {text.relative_to(ROOT)})")
    assert not missing, missing
