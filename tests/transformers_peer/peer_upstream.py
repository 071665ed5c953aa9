"""transformers' own model-test mixins, from the source distribution of the installed transformers release.

The installed wheel has ``transformers.testing_utils`` but not the repository's ``tests/`` folder. The source
distribution on PyPI (``transformers-<version>.tar.gz``) ships part of it: ``tests/test_modeling_common.py``
(``ModelTesterMixin``), ``tests/test_configuration_common.py`` (``ConfigTester``), ``tests/test_training_mixin.py``
and the other ``*_common.py`` files, unmodified and under their Apache-2.0 headers. Nothing of it is copied into this
repository: :func:`upstream_tests_dir` downloads that source distribution once, for exactly the installed version,
with pip (``pip download --no-deps --no-binary :all: transformers==<version>``), and keeps its ``tests/`` folder and
``LICENSE`` under ``<venv>/transformers-tests/<version>/``. Later runs are offline.

Three modules those files import are not in the source distribution; this package provides them (our code):

* ``tests/generation/test_utils.py``: ``GenerationTesterMixin`` is :mod:`peer_generation` here (generation
  checks of our own: ERGO's class against the stock Qwen2.5-VL class, not transformers' generation tests);
* ``tests/exporters/test_export.py``: ``ExportTesterMixin`` is an empty class (no ``torch.export`` tests);
* ``tests/utils/test_configuration_utils.py``: ``config_common_kwargs`` is empty; ``ConfigTester`` reads it only
  for configs without sub-configs, and Qwen2.5-VL's has them.

The files are loaded as the package ``hf_upstream_tests`` (never named ``tests``, never collected by pytest).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "hf_upstream_tests"
VERSION = transformers.__version__


def cache_root() -> Path:
    return Path(os.environ.get("ERGO_TRANSFORMERS_TESTS", Path(sys.prefix) / "transformers-tests")) / VERSION


def upstream_tests_dir() -> Path:
    """The ``tests/`` folder of the transformers source distribution of the installed version (downloaded once)."""
    root = cache_root()
    tests = root / "tests"
    if not (root / ".complete").exists():
        _download(root)
    # The repository's tests/__init__.py is empty and not in the source distribution; ConfigTester's module
    # executes it (`direct_transformers_import(Path(__file__).parent)`, a result it never uses).
    (tests / "__init__.py").touch()
    return tests


def _download(root: Path) -> None:
    tests = root / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"transformers=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the transformers {VERSION} source distribution "
                               f"({' '.join(cmd)}): {done.stderr.strip()[-500:]}")
        top = f"transformers-{VERSION}/"
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(top + "tests/") or member.name in (top + "LICENSE", top + "PKG-INFO"):
                    member.name = member.name[len(top):]
                    members.append(member)
            tar.extractall(root, members=members, filter="data")
    if not (tests / "test_modeling_common.py").exists():
        raise RuntimeError(f"the transformers {VERSION} source distribution has no tests/test_modeling_common.py")
    (root / ".complete").write_text(VERSION + "\n")


def _module(name: str, path: Path | list | None = None, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:  # a package: its folder, or [] for a shim package whose modules are all set here
        module.__path__ = [str(path)] if isinstance(path, Path) else path
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load(module: str) -> types.ModuleType:
    """Import ``tests/<module>.py`` of the source distribution, e.g. ``load("test_modeling_common")``."""
    if PACKAGE not in sys.modules:
        _module(PACKAGE, upstream_tests_dir())
        import peer_generation

        _module(f"{PACKAGE}.generation", [])
        sys.modules[f"{PACKAGE}.generation.test_utils"] = peer_generation
        _module(f"{PACKAGE}.exporters", [])
        _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _module(f"{PACKAGE}.utils", [])
        _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
    return importlib.import_module(f"{PACKAGE}.{module}")


if __name__ == "__main__":  # `make setup` fetches them once, so that the test run itself needs no network
    print(f"transformers {VERSION} test mixins in {upstream_tests_dir()}")
