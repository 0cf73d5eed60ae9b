"""Code versions of the stages: a hash of the library code each stage runs.

Prefect's TASK_SOURCE sees only a task function's own text, so each task also takes the hash of
the ``simu_core`` modules behind it; editing them invalidates that stage (and, through the input
keys, every stage after it). The modules behind a stage are found, not listed: the stage's
function in ``simu_core/stages.py``, the ``stages.py`` helpers and imported names it uses, and
every ``simu_core`` module those import, transitively (a hand-kept list once missed
``finetune.encode_frame`` in attribution and unlearning). ``STAGE_MODULES`` adds roots the imports
do not show (shipped data files, the library a stage's function imports by name).
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

_CORE = Path(__file__).resolve().parents[1] / "simu_core"
_DATA = Path(__file__).resolve().parents[1] / "data"
_STAGES_FILE = "stages.py"

#: Per stage, files its code depends on that imports do not show (the synthetic benchmark's
#: vocabularies and templates); the library modules themselves are found from stages.py.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "prepare_data": ("../data/synthetic",),
    "select_request": (),
    "train_target": (),
    "train_retain_reference": (),
    "attribute": (),
    "threshold_mask": (),
    "knockout": (),
    "relearn": (),
    "attack_quantize": (),
    "attack_paraphrase": (),
    "attack_in_context": (),
    "attack_logit_lens": (),
    "unlearn": (),
    "generate_alternates": (),
    "evaluate": (),
    "evaluate_reference": (),
}
#: The function of ``simu_core/stages.py`` each stage calls (default: the stage's own name).
STAGE_FUNCTIONS: dict[str, str] = {
    "train_target": "train_model",
    "train_retain_reference": "train_model",
    "evaluate_reference": "evaluate",
}


def _module_files(module: str) -> list[Path]:
    """Files executed by importing ``simu_core.a.b``: the module and its packages' ``__init__``."""
    parts = module.split(".")
    if parts[0] != "simu_core":
        return []
    files = [_CORE.joinpath(*parts[1:index], "__init__.py") for index in range(1, len(parts))]
    path = _CORE.joinpath(*parts[1:])
    files.append(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
    return [file for file in files if file.is_file()]


def _imported_modules(node: ast.AST, package: str) -> set[str]:
    """``simu_core`` modules imported anywhere under ``node`` (relative imports resolved against
    ``package``; ``from pkg import sub`` also names ``pkg.sub``)."""
    modules: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            modules.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in child.names)
    return {module for module in modules if module.split(".")[0] == "simu_core"}


def _module_name(file: Path) -> tuple[str, str]:
    """(module, package) of a file under simu_core."""
    parts = list(file.relative_to(_CORE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


@lru_cache(maxsize=None)
def _import_closure(file: Path) -> frozenset[Path]:
    """``file`` and every simu_core file it imports, transitively."""
    seen: set[Path] = set()
    pending = [file]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.suffix != ".py":
            continue
        _, package = _module_name(current)
        for module in _imported_modules(ast.parse(current.read_text()), package):
            pending.extend(_module_files(module))
    return frozenset(seen)


def _stage_function_files(function: str) -> set[Path]:
    """The files behind one function of stages.py: the helpers of stages.py it calls and every
    module it imports or whose imported names it uses, each with its import closure."""
    tree = ast.parse((_CORE / _STAGES_FILE).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if function not in functions:
        return set()
    names: dict[str, set[str]] = {}  # module-level imported name -> the modules it may come from
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("simu_core"):
            for alias in node.names:
                names[alias.asname or alias.name] = {node.module, f"{node.module}.{alias.name}"}
    modules: set[str] = set()
    pending, visited = [function], set()
    while pending:
        name = pending.pop()
        if name in visited:
            continue
        visited.add(name)
        node = functions[name]
        modules |= _imported_modules(node, "simu_core")
        for child in ast.walk(node):
            if isinstance(child, ast.Name):
                if child.id in functions:
                    pending.append(child.id)
                modules |= names.get(child.id, set())
    files: set[Path] = set()
    for module in modules:
        for file in _module_files(module):
            files |= _import_closure(file)
    return files


def _files(relative: str) -> list[Path]:
    path = (_CORE / relative).resolve()
    if path.is_dir():
        # Library code, and the vocabularies/templates the synthetic benchmark is generated from.
        return sorted(file for file in path.rglob("*") if file.suffix in (".py", ".yaml"))
    return [path] if path.exists() else []


def stage_files(stage: str) -> list[Path]:
    """Every source (and shipped data) file a stage's output depends on, sorted."""
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}; known: {sorted(STAGE_MODULES)}")
    # stages.py's whole text (and simu_core/__init__.py), but of its imports only those the stage uses.
    files = set(_module_files("simu_core.stages"))
    files |= _stage_function_files(STAGE_FUNCTIONS.get(stage, stage))
    for relative in STAGE_MODULES[stage]:
        for file in _files(relative):
            files |= _import_closure(file) if file.suffix == ".py" else {file}
    return sorted(files)


@lru_cache(maxsize=None)
def stage_code_version(stage: str) -> str:
    """sha256 (first 16 hex) over the source (and shipped data) files a stage depends on."""
    digest = hashlib.sha256(stage.encode())
    for file in stage_files(stage):
        digest.update(file.relative_to(_CORE.parent).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
