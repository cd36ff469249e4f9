"""The package's layout, read from its imports: no loops, no import back up a level, DeepSpeed only
where it belongs, and every module importable on its own (leaves first) without DeepSpeed."""
import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

from helpers import ROOT

PACKAGES = ("d2v_scale", "data_prep")


def module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (module level and inside functions)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def layer(module: str) -> int:
    """0 the models, masks and the config; 1 data; 2 the trainer's own modules (pretraining, fine-tuning,
    `load_encoder`, evaluation); 3 the commands around it (benchmarks, planner, demo, d2v-shard); 4 the
    `d2v` command."""
    if module.startswith(("d2v_scale.models", "d2v_scale.config")) or module in (
            "d2v_scale.errors", "d2v_scale.presets", "d2v_scale.masking", "d2v_scale.d2v1", "d2v_scale.d2v1.masks",
            "d2v_scale.d2v1.presets"):
        return 0
    if module.startswith("d2v_scale.data"):
        return 1
    if module.startswith(("d2v_scale.tools", "data_prep")):
        return 3
    if module == "d2v_scale.cli":
        return 4
    return 2


def test_no_import_loops_and_none_back_up_a_level():
    graph = project_imports()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import loop: {' -> '.join(e.args[1])}") from None
    assert len(order) == len(graph)
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward
    for m, deps in graph.items():          # the models know nothing of the trainer
        if m.startswith("d2v_scale.models"):
            assert all(d.startswith("d2v_scale.models") for d in deps), (m, deps)
    loops = ("d2v_scale.engine", "d2v_scale.train", "d2v_scale.finetune", "d2v_scale.preflight")
    for m, deps in graph.items():          # evaluation and load_encoder read encoders; they build no run
        if m.startswith(("d2v_scale.evaluate", "d2v_scale.pretrained")):
            assert not deps & set(loops), (m, deps & set(loops))


def test_deepspeed_only_after_the_accelerator_is_chosen_and_one_student_engine():
    initialize, top_level = [], []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:                           # module level: never DeepSpeed
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                top_level += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "deepspeed"]
            initialize += [module_name(path) for node in ast.walk(tree)
                           if isinstance(node, ast.Attribute) and node.attr == "initialize"
                           and isinstance(node.value, ast.Name) and node.value.id == "deepspeed"]
    assert not top_level, top_level
    assert sorted(initialize) == ["d2v_scale.engine"], initialize     # the teacher gathers its own blocks
    models = [p for p in (ROOT / "d2v_scale" / "models").rglob("*.py") if "deepspeed" in p.read_text()]
    assert not models, models


def test_every_module_imports_alone_leaves_first_without_deepspeed():
    order = list(TopologicalSorter(project_imports()).static_order())
    code = ("import importlib, sys\n"
            f"for m in {order!r}:\n"
            "    importlib.import_module(m)\n"
            "assert not any(k.split('.')[0] == 'deepspeed' for k in sys.modules), 'deepspeed imported'\n"
            "print(len(sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
