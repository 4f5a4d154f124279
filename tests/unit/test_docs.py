"""The docs match the tree: the configuration reference documents every setting, every
repository path named in docs/*.md and README.md exists, and every dotted module path named
there (`mesh.policy.planner.plan`) imports and has the attribute it names."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mesh.protocol import messages
from mesh.settings import MeshSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_every_setting_is_in_the_configuration_reference():
    text = (DOCS / "configuration.md").read_text()
    missing = [f"MESH_{name.upper()}" for name in MeshSettings.model_fields if f"`MESH_{name.upper()}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


# ------------------------------------------------------------ paths and modules named in the docs

TOP_DIRS = ("mesh", "workers", "tests", "bench", "scripts", "docs")
# `mesh/policy/planner.py`, `./scripts/demo`, `mesh/policy/`, `tests/faults/`; a trailing dot
# or comma ends the path, a placeholder (`mesh/<x>`) is not a path
PATH_RE = re.compile(r"(?<![\w/.\-<>])(?:\./)?((?:%s)/[\w./\-]*[\w/])" % "|".join(TOP_DIRS))
# a bare file name: `celeryconfig.py`, `test_bad_messages.py`, `docker-compose.yml` (not one
# followed by `/`: a domain or API group, `keda.sh/v1alpha1`)
FILE_RE = re.compile(r"(?<![\w/.\-<>])([A-Za-z_][\w\-]*\.(?:py|yml|yaml|toml|sh))\b(?!/)")
# `mesh.policy.planner`, `mesh.control.routing.route_task` (not `<name>/mesh.json`)
DOTTED_RE = re.compile(r"(?<![\w/.\-<>])((?:mesh|workers)(?:\.[A-Za-z_]\w*)+)")
# `owner/repo` of another project: a path right after it is in that project, not here
# (`kserve/modelmesh-serving docs/predictors/README.md`)
REPO_RE = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
# dotted names that are not modules: file names (`mesh.json`, the manifest) and the Celery
# task names (`mesh.infer`, `mesh.command`, ...)
FILE_SUFFIXES = {"json", "yaml", "yml", "toml", "txt", "md", "py", "npy", "joblib", "onnx"}
TASK_NAMES = {v for k, v in vars(messages).items() if k.endswith("_TASK")}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def _tree_file_names() -> set[str]:
    names: set[str] = set()
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        names.add(path.name)
    return names


def _after_external_repo(text: str, start: int) -> bool:
    """Whether the text just before `start` ends with another project's `owner/repo`."""
    before = text[max(0, start - 200) : start].rstrip(" \t\n`'\"")
    token = re.split(r"[\s(\[]", before)[-1].strip("`'\",:;")
    return bool(REPO_RE.fullmatch(token)) and token.split("/")[0] not in TOP_DIRS


def _found(pattern: re.Pattern[str], text: str, skip_external: bool = False):
    for m in pattern.finditer(text):
        if skip_external and _after_external_repo(text, m.start()):
            continue
        yield m.group(1), text.count("\n", 0, m.start()) + 1


def _resolves(dotted: str) -> bool:
    """`a.b.c.d`: the longest importable prefix is imported, the rest must be attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name and not name.startswith(f"{e.name}."):
                raise  # the module exists but a dependency of it is missing: a real error
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def missing_paths(text: str, tree_names: set[str] | None = None) -> list[str]:
    """The repository paths and bare file names in `text` that do not exist in the tree."""
    names = _tree_file_names() if tree_names is None else tree_names
    bad = [f"{p} (line {n})" for p, n in _found(PATH_RE, text, True) if not (ROOT / p).exists()]
    bad += [f"{p} (line {n})" for p, n in _found(FILE_RE, text, True) if p not in names]
    return bad


def unresolved_modules(text: str) -> list[str]:
    """The dotted module paths in `text` that do not import, or lack the attribute they name."""
    return [
        f"{d} (line {n})"
        for d, n in _found(DOTTED_RE, text)
        if d not in TASK_NAMES and d.rsplit(".", 1)[1] not in FILE_SUFFIXES and not _resolves(d)
    ]


def test_every_path_named_in_the_docs_exists():
    names = _tree_file_names()
    missing = {}
    for doc in _doc_files():
        bad = missing_paths(doc.read_text(), names)
        if bad:
            missing[str(doc.relative_to(ROOT))] = bad
    assert not missing, f"paths named in the docs that are not in the tree (moved or renamed?): {missing}"


def test_every_module_named_in_the_docs_resolves():
    missing = {}
    for doc in _doc_files():
        bad = unresolved_modules(doc.read_text())
        if bad:
            missing[str(doc.relative_to(ROOT))] = bad
    assert not missing, f"dotted names in the docs that do not import or resolve: {missing}"


def test_the_doc_checks_catch_made_up_names():
    """The two checks above can fail: made-up paths and names are reported, real ones and
    another project's paths are not."""
    text = (
        "See mesh/policy/planner.py and `./scripts/demo`, then mesh/policy/made_up.py, `workers/nope/`,\n"
        "made_up_module.py and celeryconfig.py. Theirs: kserve/modelmesh-serving\n"
        "`docs/predictors/README.md`. mesh.policy.planner.plan is real, mesh.policy.made_up is not,\n"
        "nor is mesh.policy.planner.no_such_function; `mesh.infer` is a task and `mesh.json` a file.\n"
    )
    assert missing_paths(text) == [
        "mesh/policy/made_up.py (line 1)",
        "workers/nope/ (line 1)",
        "made_up_module.py (line 2)",
    ]
    assert unresolved_modules(text) == [
        "mesh.policy.made_up (line 3)",
        "mesh.policy.planner.no_such_function (line 4)",
    ]
