"""The layout's rules, read from the source (DESIGN.md's table): no import cycles, and arrows that point one way.

Every import counts, also those inside functions: a cycle hidden in a function is still a cycle, and the
first call that runs it meets a half-initialised module."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("manifests", "actors", "cluster", "jobs", "benchmarks")
# What each folder may import of ours (DESIGN.md, "Layout"); benchmarks may import everything.
MAY_IMPORT = {
    "manifests": set(),
    "cluster": set(),
    "actors": {"manifests"},
    "jobs": {"manifests", "actors", "cluster"},
    "benchmarks": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at any depth of the file. `from a import b` counts a.b when b is a
    module, and an import counts the packages above its target (their __init__ runs first), except the
    packages that hold `path` itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                # a package above this module was initialised before it; only naming it counts as an import
                above = name.startswith(candidate + ".") and candidate != target
                if candidate in modules and candidate != name and not above:
                    found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_module_imports_itself_back_through_others():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_each_folder_imports_only_what_design_allows():
    wrong = []
    for name, targets in import_graph().items():
        folder = name.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != folder and other not in MAY_IMPORT[folder]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against DESIGN.md's layout: " + "; ".join(wrong)


def test_the_checks_see_a_cycle_and_a_wrong_arrow():
    """The rules above must be able to fail: a made-up graph with both faults is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "manifests.schema" in graph and "actors.finish" in graph["actors.actor"]
    assert not MAY_IMPORT["actors"] & {"jobs", "benchmarks"} and not MAY_IMPORT["manifests"]


def test_the_driver_and_the_finishing_stage_load_no_torch(tmp_path):
    """What a `generate` driver imports (the CLI, the actor class it hands Ray Data, the finishing function)
    and what a finishing worker imports must not pull in torch: ~2 CPU-s and ~300 MB in every such process.
    torch belongs to the actors, which import it when they load a model. The driver resolves and
    fingerprints the adapters a run names (a LoRA and an embedding here) without it too."""
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import save_file

    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float16),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": np.zeros((8, 4), np.float16)},
              str(tmp_path / "style.safetensors"))
    save_file({"emb_params": np.zeros((2, 32), np.float32)}, str(tmp_path / "mascot.safetensors"))
    code = ("import sys; import jobs.cli, jobs.generate, jobs.finetune, actors.actor, actors.finish, actors.watermark; "
            f"found, bad = jobs.generate.resolve_adapters({str(tmp_path)!r}, {{'style', 'mascot'}}); "
            "assert sorted(found) == ['mascot', 'style'] and not bad, bad; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)); "
            # a run naming an embedding reads its models' tokenizers: transformers' tokenizer, still no torch
            "from actors.models import describe_model; "
            "models = {'default': describe_model('default', 'tiny').defaults()}; "
            "assert jobs.generate.words_of_models({'red': 'mascot'}, models) == {'default': {'red'}}; "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == ["[]", "[]"], f"loaded by the driver's imports: {found.stdout.strip()}"


def test_every_pin_of_pyproject_is_the_locks_and_the_image_installs_extras_that_exist():
    """A fresh install takes pyproject's pins under `-c requirements.lock`: a pin the lock contradicts
    cannot be installed at all, and one it lacks resolves its dependencies afresh. TensorRT is left out of
    the lock (GPU images only)."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = project["dependencies"] + [p for name, group in extras.items() if name != "tensorrt" for p in group]
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            lock[re.sub(r"[-_.]+", "-", name.lower())] = version.strip()
    wrong = []
    for pin in pins:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", pin)
        assert match, f"pyproject.toml: {pin!r} is not pinned exactly"
        name = re.sub(r"[-_.]+", "-", match.group(1).lower())
        if lock.get(name) != match.group(3):
            wrong.append(f"{pin} (lock: {lock.get(name, 'absent')})")
    assert not wrong, "pyproject pins that requirements.lock does not hold: " + ", ".join(wrong)
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    for group in re.findall(r'sdfleet-src\[([^\]]+)\]|"\.\[([^\]]+)\]"', dockerfile):
        for extra in filter(None, ",".join(group).split(",")):
            assert extra in extras, f"k8s/Dockerfile installs the extra {extra!r}, which pyproject.toml lacks"
    assert "gcs" in extras and "s3" in extras
