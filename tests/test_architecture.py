"""The package's shape: no import cycles, the model and its operators free of target code,
imports inside functions only for optional heavy dependencies, and importing changes nothing.

The import graph is read from the sources (``ast``), module-level and function-level
imports alike, so a cycle hidden in a function body counts too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import sam3_nn

PKG = Path(sam3_nn.__file__).resolve().parent
ROOT = PKG.parent
# lazily imported where they are used: heavy or optional (not needed by every install)
HEAVY = ("torch", "transformers", "huggingface_hub", "safetensors.torch", "tvm.relax.backend",
         "tvm.support", "tvm_ffi.libinfo", "concurrent.futures", "cutlass_library",
         "importlib.metadata", "cv2", "ray", "av")
# may import anything lazily: the command line loads the compiler or the runtime on demand
LAZY_ANYTHING = {"sam3_nn.cli"}
MODEL_FORBIDDEN = ("sam3_nn.kernels", "sam3_nn.compiler", "sam3_nn.runtime", "sam3_nn.cli",
                   "sam3_nn.weights")


def _modules():
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str):
    """The sam3_nn module ``name`` refers to (a module, or an attribute of one), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str):
    """``[(imported module, lineno, inside a function)]`` of one sam3_nn module."""
    path, is_pkg = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            nested = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, child.lineno, in_func))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(mod, is_pkg, child)
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.append((full if _known(full) == full else base, child.lineno, in_func))
            visit(child, nested)

    visit(tree, False)
    return found


def graph():
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for name, _, _ in imports(m):
            target = _known(name) if name.startswith("sam3_nn") else None
            # (a package's __init__ runs before its modules, but a module imported from a
            # package's __init__ is no cycle unless it imports that __init__'s names)
            if target and target != m:
                edges[m].add(target)
    return edges


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_and_ops_import_no_target_code():
    bad = []
    for m in MODULES:
        if not m.startswith(("sam3_nn.model", "sam3_nn.ops")):
            continue
        for name, line, _ in imports(m):
            if name.startswith(MODEL_FORBIDDEN) or "cuda" in name.split(".")[-1]:
                bad.append(f"{m}:{line} imports {name}")
    assert not bad, bad


def test_imports_inside_functions_only_for_heavy_dependencies():
    bad = []
    for m in MODULES:
        if m in LAZY_ANYTHING:
            continue
        for name, line, in_func in imports(m):
            if in_func and not name.startswith(HEAVY):
                bad.append(f"{m}:{line} imports {name} inside a function")
    assert not bad, bad


def test_importing_the_package_changes_no_environment_variable():
    """``import sam3_nn`` and every module of it (the compiler, the CUDA kernels' emitters and
    the runtime included) leaves ``os.environ`` as it was."""
    code = ("import json, os, pkgutil, importlib\n"
            "before = dict(os.environ)\n"
            "import sam3_nn\n"
            "names = [m.name for m in pkgutil.walk_packages(sam3_nn.__path__, 'sam3_nn.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "for n in names: importlib.import_module(n)\n"
            "after = dict(os.environ)\n"
            "print(json.dumps([len(names), {k: v for k, v in after.items() if before.get(k) != v},\n"
            "                  [k for k in before if k not in after]]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    count, changed, removed = json.loads(p.stdout.strip().splitlines()[-1])
    assert count > 30
    assert changed == {} and removed == []
