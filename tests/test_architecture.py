"""The package's import graph runs one way (docs/architecture.md): every import of a package
module is at module level (none inside a function, where it would hide a cycle), the layers
import only downwards, there is no cycle, the runtime package never imports the developer
tooling (tools/) or the tests, and no module is named after a function it exports (so that
`mock.patch("flash_kernels.<module>.<name>")` reaches the module).

The graph is read from the source (ast), so the check needs no import order; a fresh process
then imports every module and every tool, one after another, to show that each imports.
"""

import ast
import os
import subprocess
import sys
from unittest import mock

import flash_kernels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO_ROOT, "flash_kernels")

#: Layers, lowest first: a module may import modules of its own layer or of lower ones. The
#: first matching prefix names a module's layer.
LAYERS = (
    ("core", ("flash_kernels._version", "flash_kernels.core")),
    ("backends", ("flash_kernels.backends",)),
    ("distributed", ("flash_kernels.distributed",)),
    ("public ops", ("flash_kernels.attention",)),
    ("decoding", ("flash_kernels.decoding",)),
    ("layers and self-test", ("flash_kernels.nn", "flash_kernels.selftest")),
    ("Hugging Face", ("flash_kernels.hf",)),
    ("public API", ("flash_kernels",)),
)


def module_name(path):
    relative = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
    if relative[-1] == "__init__":
        relative = relative[:-1]
    return ".".join(relative)


def package_modules():
    """{module name: source path} of every module of flash_kernels."""
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[module_name(path)] = path
    return modules


MODULES = package_modules()


def layer(module):
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module}: in no layer of LAYERS")


def resolve(module, node):
    """The absolute names a `from ... import` / `import` node of `module` refers to (for
    `from X import a`, X.a when that is a module, else X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module
    names = [f"{base}.{alias.name}" for alias in node.names]
    return [name if name in MODULES else base for name in names]


def imports(module):
    """[(imported name, inside a function)] of every import statement of `module`."""
    tree = ast.parse(open(MODULES[module]).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, inside) for name in resolve(module, child))
            visit(child, inside)

    visit(tree, False)
    return found


def package_graph():
    """{module: set of package modules it imports at module level}."""
    return {module: {name for name, _ in imports(module) if name in MODULES} for module in MODULES}


def test_no_package_import_inside_a_function():
    inside = [
        f"{module} imports {name}"
        for module in MODULES
        for name, in_function in imports(module)
        if in_function and (name in MODULES or name.split(".")[0] in ("tools", "tests"))
    ]
    assert not inside, inside


def test_the_runtime_never_imports_tools_or_tests():
    found = [
        f"{module} imports {name}"
        for module in MODULES
        for name, _ in imports(module)
        if name.split(".")[0] in ("tools", "tests", "bench", "helpers")
    ]
    assert not found, found


def test_layers_import_only_downwards():
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {name} ({LAYERS[layer(name)][0]})"
        for module, targets in package_graph().items()
        for name in targets
        if layer(name) > layer(module)
    ]
    assert not upward, upward


def test_no_import_cycle():
    graph = package_graph()
    # Importing a submodule runs its packages' __init__ first; a package importing its own
    # submodules is that order, not a cycle, so those edges are left out.
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_no_module_is_named_after_a_function_it_exports():
    shadowed = [
        name
        for name in flash_kernels.__all__
        if callable(getattr(flash_kernels, name)) and f"flash_kernels.{name}" in MODULES
    ]
    assert not shadowed, shadowed
    with mock.patch("flash_kernels.attention.mixed_chunk_attention") as patched:
        import flash_kernels.attention as attention

        assert attention.mixed_chunk_attention is patched


def test_every_module_and_tool_imports_in_a_fresh_process():
    tools = sorted(
        f"tools.{name[:-3]}"
        for name in os.listdir(os.path.join(REPO_ROOT, "tools"))
        if name.endswith(".py") and name != "__init__.py"
    )
    names = sorted(m for m in MODULES if not m.endswith("__main__")) + tools
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
