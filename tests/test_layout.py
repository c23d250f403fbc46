"""The package's layout: the library needs only torch, and the code stays in small, acyclic,
privately-closed modules.

- The library (``ep_kernels`` outside ``ep_kernels/app``) imports and trains with numpy,
  matplotlib, tqdm and scikit-learn made unimportable (those four are the application's, the
  ``train`` extra), and no library module imports them or ``ep_kernels.app``.
- Over every module of ``ep_kernels`` (read with ``ast``, nothing imported): no function longer
  than ``MAX_FUNCTION_LINES``; no use of another module's private name (``from m import _x``,
  ``m._x``; a module may use its own, and importing a private *module* such as ``_backend`` is
  fine); no import cycle, counting imports inside functions too.
"""
import ast
import os
import subprocess
import sys
import textwrap

import ep_kernels

PACKAGE_DIR = os.path.dirname(os.path.abspath(ep_kernels.__file__))
APP = "ep_kernels.app"
APP_ONLY = ("numpy", "matplotlib", "tqdm", "sklearn")  # the `train` extra, by import name
MAX_FUNCTION_LINES = 80


# --- the package's modules, read with ast ------------------------------------------------------

def _modules():
    """{dotted name: (path, is_package)} for every .py file of ep_kernels."""
    out = {}
    root = os.path.dirname(PACKAGE_DIR)
    for folder, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if os.path.isfile(os.path.join(folder, d, "__init__.py")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()
TREES = {}


def _tree(name):
    if name not in TREES:
        with open(MODULES[name][0]) as f:
            TREES[name] = ast.parse(f.read(), MODULES[name][0])
    return TREES[name]


def _is_submodule(name):
    """A module of the package (a .py file, a package, or a compiled extension such as _C)."""
    if name in MODULES:
        return True
    parent, _, leaf = name.rpartition(".")
    if parent not in MODULES or not MODULES[parent][1]:
        return False
    folder = os.path.dirname(MODULES[parent][0])
    return any(f.split(".")[0] == leaf for f in os.listdir(folder) if f.endswith((".so", ".pyd")))


def _resolve(module, node):
    """The absolute module name a ``from ... import`` in ``module`` reads from."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not MODULES[module][1]:  # a plain module: relative to its package
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module):
    """[(imported module, name or None, line)] for every import in ``module``, at any depth.
    ``from m import n``: (m.n, None) when m.n is a module, else (m, n)."""
    out = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, None, node.lineno) if _is_submodule(sub) else (src, a.name, node.lineno))
    return out


def _internal(name):
    return name == "ep_kernels" or name.startswith("ep_kernels.")


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_modules():
    return sorted(m for m in MODULES if not (m == APP or m.startswith(APP + ".")))


# --- the library without the application's dependencies ----------------------------------------

SUBPROCESS = textwrap.dedent("""
    import os, sys
    BLOCKED = {blocked!r}
    for name in BLOCKED:
        sys.modules[name] = None  # `import name` (and its submodules) now raises ImportError
    import importlib
    import torch
    import ep_kernels
    from ep_kernels import EPConv2d, EPLinear, EPNetwork, use_backend
    for name in {modules!r}:
        importlib.import_module(name)
    torch.manual_seed(0)
    net = EPNetwork(EPConv2d(1, 4, 3, padding=1, pool=2), EPLinear(4 * 4 * 4, 6),
                    readout=torch.nn.Linear(6, 3), T1=8, T2=4, beta=0.5)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    with use_backend("reference"):
        res = net.ep_backward(x, y)
        logits = net(x)
    assert torch.isfinite(res.loss) and logits.shape == (5, 3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    loaded = [n for n in BLOCKED if sys.modules.get(n) is not None]
    assert not loaded, loaded
    assert not [n for n in sys.modules if n == "ep_kernels.app" or n.startswith("ep_kernels.app.")]
    print("library ok")
""")


def test_library_needs_only_torch():
    # Every library module but the Triton kernels (they need the triton package, an optional
    # backend) and the compiled extension.
    modules = [m for m in _library_modules() if not (m == "ep_kernels.triton" or m.startswith("ep_kernels.triton."))]
    code = SUBPROCESS.format(blocked=list(APP_ONLY), modules=modules)
    env = dict(os.environ, EP_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "library ok" in out.stdout, out.stdout + out.stderr


def test_no_library_module_imports_the_application_or_its_dependencies():
    bad = []
    for m in _library_modules():
        for target, _, line in _imports(m):
            if target.split(".")[0] in APP_ONLY or target == APP or target.startswith(APP + "."):
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_application_modules_hold_the_application():
    # what moved out of the library is really in the application (and importable)
    for m in ("train", "trainer", "config", "checkpoint", "metrics", "data", "distributed", "teacher", "gradcheck"):
        assert f"{APP}.{m}" in MODULES, m
    for gone in ("ep_kernels.train", "ep_kernels.data", "ep_kernels.distributed"):
        assert gone not in MODULES, gone


# --- static checks over every module -----------------------------------------------------------

def test_no_long_functions():
    long = []
    for m in sorted(MODULES):
        for node in ast.walk(_tree(m)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name} (line {node.lineno}): {n} lines")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _module_aliases(module):
    """{local name: ep_kernels module} for names a module binds to a module of the package."""
    aliases = {}
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _internal(a.name):
                    # `import ep_kernels.x.y` binds ep_kernels; `import ep_kernels.x.y as z` binds z
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            for a in node.names:
                sub = f"{src}.{a.name}"
                if _internal(sub) and _is_submodule(sub):
                    aliases[a.asname or a.name] = sub
    return aliases


def _attribute_chain(node):
    """``a.b.c`` -> ["a", "b", "c"]; None if the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def _private_uses(module):
    bad = []
    for target, name, line in _imports(module):
        if name is not None and _internal(target) and target != module and _private(name):
            bad.append(f"{module}:{line}: from {target} import {name}")
    aliases = _module_aliases(module)
    for node in ast.walk(_tree(module)):
        chain = _attribute_chain(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in aliases:
            continue
        owner = aliases[chain[0]]
        for attr in chain[1:]:  # walk down submodules; the first non-module attribute is a name of `owner`
            if _is_submodule(f"{owner}.{attr}"):
                owner = f"{owner}.{attr}"
                continue
            if _private(attr) and owner != module:
                bad.append(f"{module}:{node.lineno}: {'.'.join(chain)} ({attr} is private to {owner})")
            break
    return bad


def test_no_use_of_other_modules_private_names():
    bad = sorted({b for m in sorted(MODULES) for b in _private_uses(m)})
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def _import_graph():
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    cycles = _cycles(graph)
    detail = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in cycles]
    assert not cycles, "import cycles among ep_kernels modules:\n" + "\n".join(detail)


def test_the_checks_see_what_they_check():
    # the graph holds known edges, so an empty result above is not an empty scan
    graph = _import_graph()
    assert "ep_kernels.app.trainer" in graph["ep_kernels.app.train"]
    assert "ep_kernels.network" in graph["ep_kernels"]
    assert "ep_kernels.models" in graph["ep_kernels.teacher"]  # an import inside a function
    assert ("ep_kernels.app.distributed", None) in {(t, n) for t, n, _ in _imports("ep_kernels.app.train")}
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
