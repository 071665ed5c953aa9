"""The repository map in the README holds: imports between the project's packages only point one way."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_ergo", "processing_ergo", "hub_card", "ergo_vqa", "training", "benchmarks")
ALLOWED = {
    "modeling_ergo": set(),
    "processing_ergo": set(),
    "hub_card": {"modeling_ergo", "processing_ergo"},
    "ergo_vqa": {"modeling_ergo", "processing_ergo", "hub_card"},
    "training": {"modeling_ergo", "processing_ergo", "hub_card", "ergo_vqa"},
    "benchmarks": {"modeling_ergo", "processing_ergo", "ergo_vqa"},
}


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """Project packages each file of ``folder`` imports, wherever the import sits (functions included)."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & set(PACKAGES)
    return found


def test_imports_follow_the_repository_map():
    for package in PACKAGES:
        for path, names in imported_packages(ROOT / package).items():
            assert names - {package} <= ALLOWED[package], (path, names - {package} - ALLOWED[package])
