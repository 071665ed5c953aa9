"""ERGO over an OpenAI-compatible endpoint, against real servers on 127.0.0.1 (random free ports, always torn down).

The served model is the shipped demo model (trained here: its stage 1 writes boxes), served by ``ergo serve``
(``transformers serve``) on the CPU. A recording proxy in front of it keeps every request body, so the tests see
exactly what the server received. Faults come from the real server (not started, killed) or from a small scripted
server (HTTP 500, malformed JSON, a slow reply).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ergo_vqa.cli import main as cli
from ergo_vqa.client import SINGLE_PASS_SYSTEM_PROMPT, ErgoClient
from ergo_vqa.demo import hub_folder
from ergo_vqa.endpoint import ChatEndpoint, openai_messages
from ergo_vqa.evaluation import evaluate
from ergo_vqa.eval_data import load_benchmark
from ergo_vqa.inference import load
from ergo_vqa.synthetic_task import generate_sample, write_split
from modeling_ergo.generation_ergo import vision_placeholder_ids
from processing_ergo.prompts_ergo import SYSTEM_PROMPT, stage1_prompt, stage2_prompt, stage_questions

pytest.importorskip("fastapi", reason="needs the serve extra (make test installs it)")

STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``ergo serve [OPTIONS] FOLDER [extra]`` in a subprocess on ``port`` (options before the folder, as a user may
    type them), on a machine without a Hub cache folder; ``start`` waits until it answers ``/health``."""

    def __init__(self, folder, port: int, log_path, extra: tuple[str, ...] = ()):
        self.folder, self.port, self.log_path, self.extra, self.process = str(folder), port, log_path, extra, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    startup_seconds = STARTUP_SECONDS
    environment = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.path.join(os.devnull, "hub")}  # never a folder

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ergo_vqa.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--dtype", "float32", self.folder, *self.extra]

    def start(self) -> "Server":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.environment})
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: "
                                   f"{open(self.log_path, 'rb').read()[-2000:].decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{' '.join(self.command()[:4])} did not answer within {self.startup_seconds} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()


class RecordingProxy:
    """Forwards ``/v1/chat/completions`` to ``upstream`` and keeps each request body (decoded JSON), in arrival order;
    the first ``failures`` requests are answered HTTP 503 instead (a fault in front of a real server)."""

    def __init__(self, upstream: str, failures: int = 0):
        self.upstream, self.bodies, self.lock, self.failures = upstream, [], threading.Lock(), failures
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.bodies.append(json.loads(raw))
                    failing, proxy.failures = proxy.failures > 0, max(proxy.failures - 1, 0)
                if failing:
                    return self.reply(503, b'{"detail": "injected by the test proxy"}')
                self.reply(*http_request(proxy.upstream + "/chat/completions", raw))

            def reply(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def take(self) -> list[dict]:
        with self.lock:
            bodies, self.bodies = self.bodies, []
        return bodies


class ScriptedServer:
    """An OpenAI-compatible stub: each request gets the next of ``replies`` (the last repeats), each reply being
    ``(status, body bytes, seconds to wait first)``."""

    def __init__(self, replies: list[tuple[int, bytes, float]]):
        self.replies, self.requests, self.lock = replies, 0, threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with stub.lock:
                    status, body, wait = stub.replies[min(stub.requests, len(stub.replies) - 1)]
                    stub.requests += 1
                time.sleep(wait)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(text: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}).encode()


def decoded_images(body: dict) -> list[Image.Image]:
    """The images of a request, decoded from their data URIs, in order."""
    images = []
    for message in body["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block["type"] == "image_url":
                data = block["image_url"]["url"].split(",", 1)[1]
                images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def texts(body: dict) -> list[tuple[str, str]]:
    """(role, text) of every text part of a request."""
    found = []
    for message in body["messages"]:
        content = message["content"]
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if block["type"] == "text":
                found.append((message["role"], block["text"]))
    return found


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    served = Server(folder, free_port(), tmp_path_factory.mktemp("logs") / "serve.log").start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def proxy(server, folder):
    recording = RecordingProxy(server.url)
    recording.served_model = str(folder)  # transformers serve serves a folder under its path
    yield recording
    recording.server.shutdown()


@pytest.fixture(scope="module")
def local(folder):
    model, processor = load(str(folder), device="cpu")
    return model, processor


@pytest.fixture(scope="module")
def questions():
    """Synthetic-task questions (the demo model's task), each with its own generated image."""
    samples = [generate_sample(f"serving-{index}") for index in range(4)]
    return [(sample.image, sample.question + "\n" + "\n".join(sample.options)) for sample in samples]


def local_ergo(model, processor, image, question: str, max_new_tokens: int, **settings):
    """What ``generate()`` does here: the stage-1 prompt length, the output, and the zoom decision it took."""
    inputs = processor.prepare([image], [question], **settings)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    reply = processor.post_process_image_text_to_text(out.sequences, prompt_length=inputs["input_ids"].shape[1])[0]
    decision = processor.plan_zooms(inputs["ergo_context"], out.stage1_texts)[0]
    return inputs, out, reply, decision


def stage2_prompt_length(processor, inputs, decision, question: str, stage1_text: str) -> int:
    """Stage 2's prompt as a server tokenises it: stage 1's prompt, stage 1's reply re-tokenised from its text (the
    server gets text, not token ids), and the new turn with the crop."""
    turn = processor.stage2_turn_tokens(decision, stage_questions(question)[1], processor.stage2_template)
    written = processor.tokenizer(stage1_text, add_special_tokens=False)["input_ids"]
    return inputs["input_ids"].shape[1] + len(written) + turn["input_ids"].shape[1]


def test_client_sends_the_local_views_and_prompts_and_gets_the_local_answers(proxy, local, questions):
    """Stage 1 carries the local coarse view and prompts, stage 2 the same conversation plus the local crop; the
    server tokenises both exactly as this process does (``usage.prompt_tokens`` equals the local length, so the
    server kept the images' sizes); greedy answers equal the local ``generate()``'s where the stage-1 reply
    re-tokenises to the tokens the model wrote (the server receives stage 1's text, not its token ids). Both stages
    send generate()'s rule against vision placeholders as ``logit_bias``."""
    model, processor = local
    client = ErgoClient(proxy.url, proxy.served_model, processor, max_tokens=64, concurrency=4, max_retries=0)
    results = client.answer_many(questions)
    bodies = proxy.take()
    assert all(result.error is None for result in results), [result.error for result in results]
    compared = zoomed = 0
    for (image, question), result in zip(questions, results):
        inputs, out, reply, decision = local_ergo(model, processor, image, question, 64)
        stem, full_question = stage_questions(question)
        [first] = [body for body in bodies if len(body["messages"]) == 2 and texts(body)[1][1] == stage1_prompt(stem)]
        assert texts(first) == [("system", SYSTEM_PROMPT), ("user", stage1_prompt(stem))]
        [coarse] = decoded_images(first)
        context, (local_coarse,) = processor.make_context([image.convert("RGB")], [full_question])
        assert same_pixels(coarse, local_coarse) and coarse.format == "PNG"
        assert result.prompt_tokens["stage1"] == inputs["input_ids"].shape[1]
        assert result.stage1_text == out.stage1_texts[0]
        assert (result.region, result.fallback) == ((list(out.regions[0]) if out.regions[0] else None),
                                                    out.fallbacks[0])
        assert result.vision_tokens == out.vision_tokens[0]
        [second] = [body for body in bodies if body["messages"][:2] == first["messages"] and len(body["messages"]) == 4]
        placeholders = {str(token): -100.0 for token in vision_placeholder_ids(processor.tokenizer)}
        assert len(placeholders) == 5 and first["logit_bias"] == second["logit_bias"] == placeholders
        assert second["messages"][2] == {"role": "assistant", "content": result.stage1_text}
        assert texts(second)[-1] == ("user", stage2_prompt(full_question, processor.stage2_template))
        crop = decoded_images(second)[1]
        assert same_pixels(crop, decision.image)
        assert result.prompt_tokens["stage2"] == stage2_prompt_length(processor, inputs, decision, question,
                                                                      result.stage1_text)
        written = processor.tokenizer(result.stage1_text, add_special_tokens=False)["input_ids"]
        stage1_ids = model.generate(**{k: v for k, v in inputs.items() if k != "ergo_context"}, max_new_tokens=64,
                                    do_sample=False)[0, inputs["input_ids"].shape[1]:]
        eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        stage1_ids = stage1_ids[:(stage1_ids == eos).nonzero()[0, 0]] if (stage1_ids == eos).any() else stage1_ids
        if stage1_ids.tolist() == written:
            assert result.final_text == reply
            compared += 1
        zoomed += result.region is not None
    assert compared >= 1, "no stage-1 reply re-tokenised as written: nothing compared"
    assert zoomed >= 1, "the demo model gave no region on these images: the crop path went untested"


@pytest.mark.parametrize("fallback", ["resize", "reference", "coarse"])
def test_fallback_policies_behave_as_locally(proxy, local, questions, fallback):
    """Stage 1 cut off at 4 tokens gives no region: each policy sends (or skips) the second image as locally."""
    model, processor = local
    image, question = questions[0]
    client = ErgoClient(proxy.url, proxy.served_model, processor, max_tokens=4, max_retries=0)
    [result] = client.answer_many([(image, question)], fallback=fallback)
    bodies = proxy.take()
    inputs, out, reply, decision = local_ergo(model, processor, image, question, 4, fallback=fallback)
    decision = processor.plan_zooms(inputs["ergo_context"], out.stage1_texts, truncated=[True])[0]
    assert result.error is None and result.fallback == out.fallbacks[0] == "truncated"
    assert result.vision_tokens == out.vision_tokens[0]
    if fallback == "coarse":
        assert len(bodies) == 1 and result.final_text == result.stage1_text and result.second_image_size is None
    else:
        assert len(bodies) == 2 and same_pixels(decoded_images(bodies[1])[1], decision.image)
        assert result.final_text == reply


def test_the_server_runs_both_stages_itself_for_a_plain_request(proxy, local, questions):
    """One plain chat request (one user message: an image and the question) to ``ergo serve`` goes through
    ``ErgoProcessor.apply_chat_template`` and ERGO's ``generate()`` inside the server: the reply is stage 2's."""
    model, processor = local
    image, question = questions[1]
    session = ChatEndpoint(proxy.url, proxy.served_model, max_retries=0)
    messages = openai_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                               [image])
    [reply] = session.chat_many([messages], max_tokens=64)
    proxy.take()
    inputs, out, local_reply, decision = local_ergo(model, processor, image, question, 64)
    assert reply.error is None and reply.text == local_reply
    assert reply.prompt_tokens == inputs["input_ids"].shape[1]  # stage 1's prompt: ERGO's, at the coarse budget
    # Streamed, the reply is both stages' text in turn, as generate(streamer=...) streams it.
    from openai import OpenAI

    stream = OpenAI(base_url=proxy.url, api_key="EMPTY", timeout=120, max_retries=0).chat.completions.create(
        model=proxy.served_model, messages=messages, max_tokens=64, temperature=0.0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    proxy.take()
    assert streamed == out.stage1_texts[0] + local_reply


def test_single_pass_requests_match_the_processor_and_are_not_taken_for_ergo(proxy, local, questions):
    model, processor = local
    image, question = questions[2]
    client = ErgoClient(proxy.url, proxy.served_model, processor, max_tokens=16, max_retries=0)
    [coarse] = client.single_pass_many([image], [question], budget=144)
    [body] = proxy.take()
    assert texts(body)[0] == ("system", SINGLE_PASS_SYSTEM_PROMPT) and len(body["messages"]) == 2
    inputs = processor.single_pass([image], [question], budget=144)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert coarse.prompt_tokens["stage1"] == inputs["input_ids"].shape[1]
    assert coarse.final_text == processor.post_process_image_text_to_text(
        output, prompt_length=inputs["input_ids"].shape[1])[0]


def http_request(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP request (POST of JSON ``data``, else GET): the status and the raw reply, errors included."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def call(url: str, body: dict | None = None) -> tuple[int, object]:
    """One HTTP request (POST with a JSON ``body``, else GET): the status and the reply, decoded when it is JSON."""
    status, payload = http_request(url, None if body is None else json.dumps(body).encode())
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload.decode(errors="replace")


def ergo_messages(url: str, question: str = "What number is written on the circle?") -> list[dict]:
    """A plain ERGO request: one user message with one image (``url``) and the question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_server_loads_no_other_model_than_its_folder(server, folder, tmp_path):
    """``--trust-remote-code`` runs a folder's code: a client cannot make the server load another folder, neither
    by naming it in a request nor through transformers serve's ``/load_model`` (which ignored the pin)."""
    other = hub_folder(tmp_path)  # a loadable ERGO folder, refused for not being the served one
    status, reply = call(server.url.removesuffix("/v1") + "/load_model", {"model": str(other)})
    assert status == 403 and str(folder) in reply["detail"] and "--allow-other-models" in reply["detail"], reply
    status, reply = call(server.url + "/chat/completions", {"model": str(other), "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and str(folder) in reply["detail"], reply


def test_models_lists_the_served_folder_without_a_hub_cache(server, folder):
    """``/v1/models`` was an HTTP 500 on a machine without a Hub cache folder (as here)."""
    status, reply = call(server.url + "/models")
    assert status == 200 and [model["id"] for model in reply["data"]] == [str(folder)], reply


def test_other_models_are_opt_in(folder, questions, tmp_path):
    """With ``--allow-other-models`` a request may name another folder, loaded on demand; the served one stays."""
    other = hub_folder(tmp_path)
    served = Server(folder, free_port(), tmp_path / "serve.log", extra=("--allow-other-models",)).start()
    try:
        image, question = questions[0]
        replies = {}
        for name in (str(other), str(folder)):
            status, reply = call(served.url + "/chat/completions", {
                "model": name, "messages": ergo_messages(data_uri(image), question), "max_tokens": 8})
            assert status == 200, reply
            replies[name] = reply["choices"][0]["message"]["content"]
        assert replies[str(other)] == replies[str(folder)]  # the same weights, so the same greedy reply
        status, listed = call(served.url + "/models")
        assert status == 200 and listed["data"][0]["id"] == str(folder), listed
    finally:
        served.stop()


def test_n_above_one_is_refused(server, folder, questions):
    """transformers serve ignores ``n`` and returned one choice for ``n=2``; ergo serve says so instead."""
    status, reply = call(server.url + "/chat/completions", {
        "model": str(folder), "messages": ergo_messages(data_uri(questions[0][0])), "max_tokens": 1, "n": 2})
    assert status == 400 and reply["detail"].startswith("n=2: "), reply


def test_a_temperature_above_zero_samples_even_when_the_folder_is_greedy(server, folder, questions):
    """The demo folder's generation config is greedy; a request's temperature > 0 asks for sampling (seeded by
    ``seed``), 0 or none for the greedy reply."""
    messages = ergo_messages(data_uri(questions[3][0]), questions[3][1])

    def ask(**settings) -> str:
        status, reply = call(server.url + "/chat/completions", {"model": str(folder), "messages": messages,
                                                                "max_tokens": 8, **settings})
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]

    greedy = ask()
    assert ask(temperature=0.0) == greedy
    sampled = [ask(temperature=5.0, seed=seed) for seed in range(3)]
    assert len(set(sampled)) > 1, sampled
    assert ask(temperature=5.0, seed=1) == sampled[1]  # seeded, so reproducible


@pytest.mark.parametrize("system_turn", [False, True], ids=["ergo", "single-pass"])
@pytest.mark.parametrize("url, problem", [("data:image/png;base64,AAAA", "cannot read image"),
                                          ("photo.jpg", "image file not found")])
def test_an_unreadable_image_is_a_400_naming_it(server, folder, system_turn, url, problem):
    """A malformed image was a bare HTTP 500; it is now a 400 that says which image and what is wrong."""
    messages = [{"role": "system", "content": "Answer briefly."}] * system_turn + ergo_messages(url)
    status, reply = call(server.url + "/chat/completions", {"model": str(folder), "messages": messages,
                                                            "max_tokens": 1})
    where = f"messages[{int(system_turn)}].content[0].image_url"
    assert status == 400 and reply["detail"].startswith(f"{where}: {problem}"), reply


def test_ergo_eval_over_the_endpoint_records_endpoint_and_served_model(proxy, folder, tmp_path, capsys):
    write_split(tmp_path / "data", "test", 3, seed=7)
    out = tmp_path / "out"
    status = cli(["eval", "--endpoint", proxy.url, "--served-model", proxy.served_model, "--model", str(folder),
                  "--dataset", "synthetic", "--data-root", str(tmp_path / "data"), "--budget", "144",
                  "--max-new-tokens", "64", "--concurrency", "3", "--out", str(out)])
    proxy.take()
    assert status == 0, capsys.readouterr().err
    [records_file] = out.glob("synthetic-ergo-144-*.jsonl")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert sorted(record["id"] for record in records) == sorted(s.id for s in load_benchmark(
        "synthetic", tmp_path / "data", split="test"))
    for record in records:
        assert record["failure"] is None and record["vision_tokens"]["stage1"] == 144
        assert record["settings"]["endpoint"] == proxy.url and record["settings"]["served_model"] == proxy.served_model
        assert "weights" not in record["settings"] and record["prompt_tokens"]["stage1"] > 144


def test_load_64_requests_at_concurrency_8_none_lost_none_duplicated(proxy, questions, local, capsys):
    """64 ERGO requests, each kept to one short chat request (stage 1 of one token at a 16-token coarse view, then
    the ``coarse`` fallback), so the check stays cheap on a CPU: every request reaches the server once, and every
    result is its own request's."""
    _, processor = local
    requests = [(questions[index % 4][0], f"What number is written on shape {index}?") for index in range(64)]
    client = ErgoClient(proxy.url, proxy.served_model, processor, max_tokens=1, concurrency=8, max_retries=0)
    started = time.perf_counter()
    results = client.answer_many(requests, coarse_budget=16, crop_budget=16, fallback="coarse")
    seconds = time.perf_counter() - started
    bodies = proxy.take()
    assert [result.error for result in results] == [None] * 64 and len(bodies) == 64
    sent = [texts(body)[1][1] for body in bodies]
    assert sorted(sent) == sorted(stage1_prompt(stage_questions(q)[0]) for _, q in requests)  # each once, none lost
    assert all(result.fallback == "truncated" and result.completion_tokens["stage1"] == 1 for result in results)
    for (image, question), result in zip(requests, results):  # each result is its own request's
        expected = processor.prepare([image], [question], coarse_budget=16)["input_ids"].shape[1]
        assert result.prompt_tokens["stage1"] == expected
    with capsys.disabled():
        print(f"\n[load] 64 requests at concurrency 8 against ergo serve (CPU, demo model): {seconds:.1f} s, "
              f"{64 / seconds:.2f} requests/s")


def test_server_killed_mid_evaluation_keeps_finished_records_and_a_rerun_completes(folder, tmp_path):
    served = Server(folder, free_port(), tmp_path / "serve.log").start()
    try:
        client = ErgoClient(served.url, str(folder), str(folder), concurrency=1, max_retries=1, timeout=30)
        check_kill_and_restart_mid_evaluation(served, client, tmp_path)
    finally:
        served.stop()


def check_kill_and_restart_mid_evaluation(served: Server, client: ErgoClient, tmp_path) -> None:
    """An evaluation over ``client`` while ``served`` is killed after two records: finished records are kept, the
    others fail with a connection error; after a restart on the same port a rerun completes, running none twice."""
    write_split(tmp_path / "data", "test", 5, seed=3)
    samples = load_benchmark("synthetic", tmp_path / "data", split="test")
    out = tmp_path / "out"
    settings = {"budget": 144, "max_new_tokens": 4, "fallback": "coarse", "progress": False}  # one request each

    def kill_after_two_records():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            files = list(out.glob("synthetic-ergo-*.jsonl"))
            if files and len(files[0].read_text().splitlines()) >= 2:
                served.process.kill()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_two_records)
    killer.start()
    first = evaluate(client, client.processor, samples, "ergo", out, "synthetic", batch_size=1, **settings)
    killer.join()
    assert first["run"] >= 2 and first["failed"] >= 1 and first["run"] + first["failed"] == 5
    assert all("APIConnectionError" in failure["failure"] for failure in first["failures"])
    served.stop()
    served.start()  # the same endpoint again
    second = evaluate(client, client.processor, samples, "ergo", out, "synthetic", batch_size=1, **settings)
    assert second["run"] == 5 and second["failed"] == 0
    [records] = out.glob("synthetic-ergo-*.jsonl")
    succeeded = [json.loads(line)["id"] for line in records.read_text().splitlines()
                 if json.loads(line)["failure"] is None]
    assert sorted(succeeded) == sorted(s.id for s in samples)  # finished ones kept, none run twice


# ---------------------------------------------------------------- faults from a scripted server


def test_server_not_up_fails_each_sample_after_retries_and_the_exit_status_says_so(folder, tmp_path, capsys):
    write_split(tmp_path / "data", "test", 2, seed=5)
    out = tmp_path / "out"
    status = cli(["eval", "--endpoint", f"http://127.0.0.1:{free_port()}/v1", "--served-model", "m", "--model",
                  str(folder), "--dataset", "synthetic", "--data-root", str(tmp_path / "data"), "--budget", "144",
                  "--concurrency", "2", "--timeout", "5", "--out", str(out)])
    assert status == 1 and "2 sample(s) failed" in capsys.readouterr().err
    [summary] = [json.loads(path.read_text()) for path in out.glob("synthetic-ergo-*.summary.json")]
    assert summary["failed"] == 2 and summary["run"] == 0
    assert all("APIConnectionError" in failure["failure"] for failure in summary["failures"])


def test_http_500_then_success_is_retried(folder):
    stub = ScriptedServer([(500, b'{"detail": "overloaded"}', 0), (200, completion("<answer>B</answer>"), 0)])
    try:
        client = ErgoClient(stub.url, "m", str(folder), max_retries=2, fallback="coarse")
        result = client.answer(generate_sample(1).image, "What number?\n(A) 0\n(B) 1")
    finally:
        stub.close()
    assert result.error is None and result.answer == "B" and stub.requests == 2


def test_malformed_json_is_a_clear_per_sample_failure(folder):
    stub = ScriptedServer([(200, b"{not json", 0)])
    try:
        client = ErgoClient(stub.url, "m", str(folder), max_retries=0)
        results = client.answer_many([(generate_sample(1).image, "What number?"), ("missing.png", "What number?")])
    finally:
        stub.close()
    assert results[0].error.startswith("stage 1: malformed reply, not JSON")
    assert "missing.png" in results[1].error and results[1].answer is None  # each sample its own failure


def test_slow_server_times_out(folder):
    stub = ScriptedServer([(200, completion("<answer>A</answer>"), 3.0)])
    try:
        client = ErgoClient(stub.url, "m", str(folder), max_retries=0, timeout=0.5)
        started = time.perf_counter()
        result = client.answer(generate_sample(1).image, "What number?")
        elapsed = time.perf_counter() - started
    finally:
        stub.close()
    assert "APITimeoutError" in result.error and elapsed < 2.5


def test_ergo_infer_over_an_endpoint_reports_usage_and_a_failure_exits_1(folder, tmp_path, capsys):
    image = tmp_path / "scene.png"
    generate_sample(2).image.save(image)
    arguments = ["infer", "--model", str(folder), "--served-model", "m", "--image", str(image), "--question",
                 "What number?\n(A) 0\n(B) 1"]
    stub = ScriptedServer([(200, completion("<think> near </think> <zoom>[10, 10, 200, 120]</zoom>"), 0),
                           (200, completion("<answer>B</answer>"), 0)])
    try:
        assert cli([*arguments, "--endpoint", stub.url]) == 0
    finally:
        stub.close()
    printed = capsys.readouterr().out
    assert "answer:        'B'" in printed and "region:        [40, 40, 800, 480]" in printed  # 4x the coarse box
    assert "prompt tokens stage 1 10 + stage 2 10 = 20" in printed
    assert stub.requests == 2
    stub = ScriptedServer([(503, b'{"detail": "down"}', 0)])
    try:
        assert cli([*arguments, "--endpoint", stub.url, "--timeout", "5"]) == 1
    finally:
        stub.close()
    assert "failed:        stage 1: InternalServerError (HTTP 503)" in capsys.readouterr().out
    assert stub.requests == 4  # the first attempt and 3 retries
