"""The direction of dependencies between modalkv's modules: a lower layer never imports a higher one, and there is
no import cycle (imports inside functions count too)."""

import ast
from pathlib import Path

import modalkv

SRC = Path(modalkv.__file__).parent

#: Layers, lowest first; a module may import its own layer and the layers below. A module not listed takes the
#: layer of its package (``modalkv.methods.h2o`` -> ``modalkv.methods``).
LAYERS = [
    {"rope", "modality", "data", "pruning", "scoring", "weights", "tasks.base", "decoding", "protocol", "registry"},
    {"budget", "vlm", "storage"},  # budgets, the VLM's loading, storage formats (payloads, fused kernels)
    {"store", "attention"},  # one (layer, KV head)'s entries; modalkv's attention function
    {"layer"},  # a managed cache layer (prefill compression, appends, decode_budget eviction)
    {"cache"},  # KVCache, the public cache
    {"methods"},  # eviction methods -> core
    {"context", "replay", "saved", "measure", "models", "continual", "tasks", "vlm_train"},  # uses of caches and models
    {"bench", "serving", ""},  # the benchmark harness, and the package's public API (modalkv/__init__.py)
    {"cli"},  # the command line
]
#: Edges allowed to break the layering, as (importer, imported): none.
KNOWN_UPWARD: set[tuple[str, str]] = set()
#: Import cycles allowed, as sets of modules: none.
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """modalkv modules imported anywhere in the file, relative to the package (``""`` is modalkv itself)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """:func:`imports` of the source text of module ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("modalkv"):
                target = node.module.removeprefix("modalkv").lstrip(".")
            else:
                continue
            for alias in node.names:  # "from . import vlm" imports the module modalkv.vlm
                sub = f"{target}.{alias.name}".lstrip(".")
                exists = (SRC / (sub.replace(".", "/") + ".py")).exists() or (SRC / sub.replace(".", "/")).is_dir()
                out.add(sub if exists else target)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("modalkv").lstrip(".") for a in node.names if a.name.startswith("modalkv")}
    return out - {name}


def layer_of(module: str) -> int:
    probe = module
    while True:
        for i, layer in enumerate(LAYERS):
            if probe in layer:
                return i
        if not probe:
            raise AssertionError(f"modalkv.{module} is in no layer of tests/test_layers.py: add it to LAYERS")
        probe = probe.rpartition(".")[0]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def test_lower_layers_never_import_higher_ones():
    upward = sorted((a, b) for a, deps in graph().items() for b in deps
                    if layer_of(b) > layer_of(a) and (a, b) not in KNOWN_UPWARD)
    assert not upward, f"lower layers import higher ones (importer, imported): {upward}"


def test_no_import_cycles_beyond_the_known_ones():
    edges = {a: {b for b in deps if (a, b) not in KNOWN_UPWARD} for a, deps in graph().items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for b in edges.get(todo.pop(), ()):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    cycles = []
    for a in sorted(edges):
        members = {b for b in reach(a) if a in reach(b)} | {a}
        if len(members) > 1 and members not in cycles and members not in KNOWN_CYCLES:
            cycles.append(members)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_check_sees_function_local_imports():
    """The checker itself: an import inside a function counts, and relative imports resolve."""
    assert imports(SRC / "scoring.py") == set()
    assert "weights" in imports(SRC / "vlm.py") and "models" not in imports(SRC / "vlm.py")
    source = "from ..protocol import Selection\n\ndef f():\n    from .base import Method\n    from ..import cache\n"
    assert imports_in(source, "methods.h2o") == {"protocol", "methods.base", "cache"}
    assert layer_of("methods.h2o") > layer_of("cache") > layer_of("layer") > layer_of("attention") > layer_of("protocol")


def private_names_used(source: str, name: str, is_package: bool = False) -> set[str]:
    """Private names (``_x``, not dunder) a module takes from another modalkv module: ``from .m import _x`` or
    ``m._x`` on a modalkv module it imported."""
    tree = ast.parse(source)
    found, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("modalkv")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add(alias.name)
                modules.add(alias.asname or alias.name)  # may be a module ("from . import scoring")
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("modalkv")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.add(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_names_across_modules():
    used = {module_name(p): private_names_used(p.read_text(), module_name(p)) for p in SRC.rglob("*.py")}
    used = {m: names for m, names in used.items() if names}
    assert not used, f"modules importing another module's private names (give them public names): {used}"


def test_the_private_name_check_sees_both_forms():
    source = "from ..modality import TEXT, _runs\nfrom .. import scoring\n\ndef f():\n    return scoring._probs\n"
    assert private_names_used(source, "methods.x") == {"_runs", "scoring._probs"}
