"""Dependencies run one way (docs/design.md): core imports no app, accounts imports no other app,
chat never imports notifications. Checked on the source, so a lazy import inside a function
counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = {"core", "accounts", "chat", "notifications"}
MAY_IMPORT = {
    "core": set(),
    "accounts": {"core"},
    "chat": {"core", "accounts"},
    "notifications": {"core", "accounts", "chat"},
}


def imported_apps(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{file: the other apps it imports}, migrations excluded."""
    found: dict[str, set[str]] = {}
    for path in (root / package).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        others = (names & APPS) - {package}
        if others:
            found[str(path.relative_to(root))] = others
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_dependencies_run_one_way(package):
    wrong = {path: others - MAY_IMPORT[package] for path, others in imported_apps(package).items()}
    assert {path: others for path, others in wrong.items() if others} == {}


def test_the_check_sees_lazy_imports(tmp_path):
    """A check that cannot fail is no check: an import inside a function is found."""
    package = tmp_path / "core"
    package.mkdir()
    (package / "sneaky.py").write_text("def f():\n    from chat import events\n")
    assert imported_apps("core", tmp_path) == {"core/sneaky.py": {"chat"}}
