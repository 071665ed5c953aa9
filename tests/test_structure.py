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


def private_imports(folder: Path) -> list[tuple[str, str, str]]:
    """``(file, module, name)`` for each underscore name a file of ``folder`` imports from another project package."""
    found = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                package = node.module.split(".")[0]
                if package in PACKAGES and package != folder.name:
                    found += [(str(path.relative_to(ROOT)), node.module, alias.name)
                              for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_package_imports_another_package_private_names():
    """A package's underscore names are its own to change; another package that needs one needs a public name."""
    for package in PACKAGES:
        assert private_imports(ROOT / package) == []
