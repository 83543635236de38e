"""The house's layout (docs/layout.md): imports point one way, each folder imports only what its line allows."""
from __future__ import annotations

import ast
import os
import subprocess

from tests.conftest import REPO_ROOT

# What each part of the code may import of ours (docs/layout.md says the same, one line per folder).
ALLOWED = {
    "utils.devices": set(),
    "utils.config": set(),
    "utils.faces": set(),
    "utils.run": {"utils.config", "utils.devices"},
    "utils.data": {"utils.run", "utils.config", "utils.devices"},
    "backbones": set(),
    "utils.weights": {"backbones", "utils.run"},
    "losses": {"utils.devices"},
    "metric_losses": {"losses", "utils.devices"},
    "softmax_head": {"utils.devices"},
    "pfc": {"losses", "utils.devices"},
    "partial_fc": {"losses", "pfc", "utils.devices"},
    "distill": {"backbones", "utils.weights", "utils.run", "utils.config"},
    "dataset": {"backbones", "utils.data", "utils.run", "utils.config", "utils.devices"},
    "eval": {"backbones", "utils.data", "utils.devices", "utils.faces", "utils.weights", "utils.config"},
}
# Deprecated one-release re-exports at their old paths (utils/recordio.py, ...): they import their new home.
SHIMS = {"utils.recordio": "utils.data", "utils.mtcnn": "utils.faces", "utils.checkpoint": "utils.run"}


def module_graph() -> dict[str, set[str]]:
    """{module: modules of ours it imports anywhere (top level or inside functions)}, tests excluded."""
    files = subprocess.check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                                    cwd=REPO_ROOT, text=True).split()
    files = [f for f in files if not f.startswith("tests/") and os.path.exists(os.path.join(REPO_ROOT, f))]
    modules = {f[:-3].replace("/", ".").removesuffix(".__init__"): f for f in files}
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(REPO_ROOT, path)).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    deps.add(name)
        graph[module] = deps
    return graph


def room(module: str) -> str:
    """The part of the house a module belongs to: utils.<folder>, or its top-level module/package."""
    parts = module.split(".")
    if module in SHIMS:
        return module
    return ".".join(parts[:2]) if parts[0] == "utils" and len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert cycles(module_graph()) == []


def test_each_folder_imports_only_what_its_line_allows():
    wrong = []
    for module, deps in module_graph().items():
        own = room(module)
        if own in SHIMS:
            assert {room(dep) for dep in deps} <= {SHIMS[own]}, (module, deps)
            continue
        if own not in ALLOWED:
            continue  # train.py and tools/ sit on top and may import anything
        wrong += [f"{module} -> {dep}" for dep in deps if room(dep) != own and room(dep) not in ALLOWED[own]]
    assert wrong == []


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_utils_top_level_holds_only_folders_and_marked_re_exports():
    utils = os.path.join(REPO_ROOT, "utils")
    modules = sorted(name[:-3] for name in os.listdir(utils) if name.endswith(".py") and name != "__init__.py")
    assert modules == sorted(name.split(".")[1] for name in SHIMS)
    for name in modules:
        assert "Deprecated import path" in open(os.path.join(utils, f"{name}.py")).read()


def test_old_import_paths_still_work_and_say_they_are_deprecated():
    import subprocess
    import sys

    code = ("import warnings\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    from utils.recordio import MXIndexedRecordIO, unpack\n"
            "    from utils.mtcnn import MTCNN, nms\n"
            "    from utils.checkpoint import load_checkpoint, _progress_key\n"
            "from utils.weights import load_backbone, load_backbone_file\n"
            "from utils.config import load_config, ConfigError\n"
            "import utils.data.recordio as r, utils.faces.mtcnn as m, utils.run.checkpoint as c, utils.weights.load as w\n"
            "assert (MXIndexedRecordIO, unpack, MTCNN, nms) == (r.MXIndexedRecordIO, r.unpack, m.MTCNN, m.nms)\n"
            "assert (load_checkpoint, _progress_key, load_backbone) == (c.load_checkpoint, c._progress_key, w.load_backbone)\n"
            "print(sorted(str(w.message).split()[0] for w in caught if w.category is DeprecationWarning))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["['utils.checkpoint',", "'utils.mtcnn',", "'utils.recordio']"]
