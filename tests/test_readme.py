"""The README's Python example, run exactly as printed, on the shipped demo model; ``readme_block`` also serves the
tests that run the examples of the pages under ``docs/``."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def readme_block(section: str, language: str = "python", index: int = 0, level: str = "##",
                 path: str = "README.md") -> str:
    """The ``index``-th ```language block under the heading ``section`` of ``path`` (the README or a page under
    ``docs/``, relative to the clone's root), up to the next ``## `` heading: the examples are tested where they are
    printed."""
    text = (ROOT / path).read_text()
    body = text.split(f"\n{level} {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", body, re.DOTALL)
    assert len(blocks) > index, f"no {language} block {index} under {level} {section} in {path}"
    return blocks[index]


def test_the_python_example_answers_with_the_demo_model(monkeypatch, capsys):
    """Loads through the Auto classes and a pipeline with trust_remote_code (from the clone's root, as the README
    says), asks the generated question and gets the right answer, the same from generate() and the pipeline, with no
    special tokens in either."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "readme"}
    exec(compile(readme_block("Python"), "README.md (## Python)", "exec"), namespace)
    answer, reply, sample = namespace["answer"][0], namespace["reply"][0]["generated_text"], namespace["sample"]
    assert reply == answer
    assert re.search(rf"<answer>\s*\(?{sample.answer}\)?\s*</answer>", answer), answer
    assert not any(token in answer for token in SPECIALS)
    assert capsys.readouterr().out == f"{answer} | right answer: {sample.answer}\n{reply}\n"
