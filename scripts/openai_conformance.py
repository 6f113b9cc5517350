#!/usr/bin/env python3
"""Conformance checks for the OpenAI-compatible server (`llava-wgpu serve`), driven
by the official `openai` Python client.

What it checks (one PASS/FAIL line each; the exit status is non-zero if any fails):

 1. models: `models.list()` returns exactly one model, `models.retrieve(id)` returns
    it, and `models.retrieve("gpt-4o")` raises `openai.NotFoundError` (404).
 2. image_chat: an image (data URL of weights/tiny-llava-shapes/example1.png) plus
    "Which color does the cross have?" with max_tokens=8 answers "white".
 3. text_only_chat: a chat completion without an image answers a non-empty string.
 4. two_images: two image_url parts (example1.png, example2.png) and a text part in
    one user message answer 200 with non-empty content.
 5. follow_up: turn 1 (image + question) and then
    [user(image + q1), assistant(answer1), user("Which shape is green?")] answers.
 6. streaming: for "Where is the white cross?" (a multi-token answer), with
    stream=True and stream_options={"include_usage": True} the concatenated deltas
    equal the non-streamed answer (temperature 0), and the last chunk carries usage.
 7. logprobs: for the same question, with logprobs=True, top_logprobs=3 every
    content entry has a `token` without SentencePiece's "▁", `bytes` (ints) whose
    UTF-8 decoding equals the token when it is valid UTF-8, and at most 3
    `top_logprobs`, each with bytes (checked the same way).
 8. bad_image: an undecodable image (data:image/png;base64 of b"not a picture")
    raises `openai.BadRequestError` (400) with code "invalid_image_format".
 9. unsupported_params: `tools=[...]` raises BadRequestError with param "tools";
    `response_format={"type": "json_object"}` raises it with param "response_format".
10. raw_http (urllib, not the openai client): GET /v1/nope is 404 with a JSON
    `{"error": {...}}` body; GET /v1/chat/completions is 405 with a JSON error body;
    an OPTIONS preflight with Origin http://localhost:3000 answers
    `access-control-allow-origin: http://localhost:3000` (the server must be started
    with `--cors http://localhost:3000`).

Every network call has a timeout; nothing but the given server is contacted. Image
files are read relative to the repository root (the parent of scripts/), whatever
the current directory is.

How to run (needs `pip install openai`, see scripts/requirements.txt):

  * Against a server that is already running (started with
    `--cors http://localhost:3000`):

        python3 scripts/openai_conformance.py --base-url http://127.0.0.1:8080/v1

  * Let the script start the server itself on a free loopback port (from the
    repository root, so it serves the demo model weights/tiny-llava-shapes), wait for
    GET /health to say "ok", run the checks and stop it again:

        python3 scripts/openai_conformance.py --start target/release/llava-wgpu
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import openai

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "weights" / "tiny-llava-shapes"
CORS_ORIGIN = "http://localhost:3000"
REQUEST_TIMEOUT_S = 120.0  # per request made through the openai client
RAW_TIMEOUT_S = 30.0  # per request made with urllib
STARTUP_TIMEOUT_S = 120.0  # how long --start waits for /health to say "ok"
SENTENCEPIECE_SPACE = "\u2581"  # "▁"

Q_CROSS = "Which color does the cross have?"
Q_GREEN = "Which shape is green?"
Q_WHERE = "Where is the white cross?"  # a multi-token answer ("bottom left") for checks 6 and 7


class CheckFailed(Exception):
    """A check's expectation did not hold."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def image_data_url(name: str) -> str:
    data = (MODEL_DIR / name).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def error_code(e: openai.APIStatusError) -> str | None:
    """The `code` of an OpenAI-style error body, from `e.code` or `e.body`."""
    if e.code is not None:
        return e.code
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code")
    return None


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_url(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port/health"""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path + "/health", "", ""))


def wait_for_health(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Poll GET /health until it answers 200 with status "ok" (503 "loading" before)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
                if resp.status == 200 and body.get("status") == "ok":
                    return
                last = f"{resp.status} {body}"
        except urllib.error.HTTPError as e:  # 503 while loading
            last = f"{e.code} {e.read()[:200]!r}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not say ok within {timeout_s:.0f} s (last: {last})")


class Server:
    """`BINARY serve` on a free loopback port, run from the repository root."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = tempfile.NamedTemporaryFile(prefix="openai-conformance-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [self.binary, "serve", "--port", str(self.port), "--cors", CORS_ORIGIN]
        print(f"starting: {' '.join(cmd)} (cwd {REPO_ROOT}, log {self.log.name})", flush=True)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        t0 = time.monotonic()
        wait_for_health(health_url(self.base_url), self.proc, STARTUP_TIMEOUT_S)
        print(f"server ready after {time.monotonic() - t0:.1f} s", flush=True)

    def stop(self, keep_log: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        if keep_log:
            print(f"server log kept: {self.log.name}", flush=True)
        else:
            Path(self.log.name).unlink(missing_ok=True)

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- checks


class Checks:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )
        self.img1 = image_data_url("example1.png")
        self.img2 = image_data_url("example2.png")
        self.model = "tiny-llava-shapes"  # replaced by the served id in check 1

    def chat(self, messages: list, **kwargs):
        return self.client.chat.completions.create(model=self.model, messages=messages, **kwargs)

    def cross_messages(self, question: str = Q_CROSS) -> list:
        return [{"role": "user", "content": [image_part(self.img1), text_part(question)]}]

    # 1
    def models(self) -> str:
        models = self.client.models.list().data
        expect(len(models) == 1, f"models.list() returned {len(models)} models: {models}")
        model_id = models[0].id
        self.model = model_id
        got = self.client.models.retrieve(model_id)
        expect(got.id == model_id, f"retrieve({model_id!r}) returned id {got.id!r}")
        try:
            self.client.models.retrieve("gpt-4o")
        except openai.NotFoundError as e:
            expect(e.status_code == 404, f"status {e.status_code}")
        else:
            raise CheckFailed('retrieve("gpt-4o") did not raise NotFoundError')
        return f"model {model_id!r}"

    # 2
    def image_chat(self) -> str:
        r = self.chat(self.cross_messages(), max_tokens=8)
        answer = r.choices[0].message.content
        expect(isinstance(answer, str) and "white" in answer.lower(), f"answer {answer!r} lacks 'white'")
        return f"answer {answer!r}"

    # 3
    def text_only_chat(self) -> str:
        r = self.chat([{"role": "user", "content": "Which shape is green?"}], max_tokens=8)
        answer = r.choices[0].message.content
        expect(isinstance(answer, str) and answer.strip() != "", f"empty answer {answer!r}")
        return f"answer {answer!r}"

    # 4
    def two_images(self) -> str:
        content = [image_part(self.img1), image_part(self.img2), text_part("What color is the cross?")]
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=[{"role": "user", "content": content}], max_tokens=8
        )
        expect(raw.status_code == 200, f"status {raw.status_code}")
        answer = raw.parse().choices[0].message.content
        expect(isinstance(answer, str) and answer.strip() != "", f"empty answer {answer!r}")
        return f"answer {answer!r}"

    # 5
    def follow_up(self) -> str:
        turn1 = self.cross_messages()
        answer1 = self.chat(turn1, max_tokens=8).choices[0].message.content
        expect(isinstance(answer1, str) and answer1.strip() != "", f"empty turn-1 answer {answer1!r}")
        turn2 = turn1 + [
            {"role": "assistant", "content": answer1},
            {"role": "user", "content": Q_GREEN},
        ]
        answer2 = self.chat(turn2, max_tokens=8).choices[0].message.content
        expect(isinstance(answer2, str) and answer2.strip() != "", f"empty turn-2 answer {answer2!r}")
        return f"answers {answer1!r}, {answer2!r}"

    # 6
    def streaming(self) -> str:
        params = dict(max_tokens=16, temperature=0)
        expected = self.chat(self.cross_messages(Q_WHERE), **params).choices[0].message.content
        stream = self.chat(
            self.cross_messages(Q_WHERE), stream=True, stream_options={"include_usage": True}, **params
        )
        pieces, chunks = [], []
        with stream:
            for chunk in stream:
                chunks.append(chunk)
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
        streamed = "".join(pieces)
        expect(streamed == expected, f"streamed {streamed!r} != non-streamed {expected!r}")
        expect(len(chunks) > 0, "no chunks")
        usage = chunks[-1].usage
        expect(usage is not None, f"last chunk has no usage: {chunks[-1]}")
        expect(
            usage.completion_tokens > 0 and usage.prompt_tokens > 0
            and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
            f"implausible usage {usage}",
        )
        return f"{len(chunks)} chunks, text {streamed!r}, usage {usage.prompt_tokens}+{usage.completion_tokens}"

    # 7
    def logprobs(self) -> str:
        r = self.chat(self.cross_messages(Q_WHERE), max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
        lp = r.choices[0].logprobs
        expect(lp is not None and lp.content, f"no logprobs.content: {lp}")

        def check_entry(where: str, e) -> None:
            expect(isinstance(e.token, str), f"{where}: token {e.token!r} is not a string")
            expect(SENTENCEPIECE_SPACE not in e.token, f"{where}: token {e.token!r} contains '▁'")
            expect(
                isinstance(e.bytes, list) and all(isinstance(b, int) and 0 <= b < 256 for b in e.bytes),
                f"{where}: bytes {e.bytes!r} is not a list of byte values",
            )
            try:
                decoded = bytes(e.bytes).decode("utf-8")
            except UnicodeDecodeError:
                return  # a partial UTF-8 sequence: nothing to compare
            expect(decoded == e.token, f"{where}: bytes decode to {decoded!r}, token is {e.token!r}")

        for i, entry in enumerate(lp.content):
            check_entry(f"content[{i}]", entry)
            expect(entry.top_logprobs is not None, f"content[{i}]: no top_logprobs")
            expect(len(entry.top_logprobs) <= 3, f"content[{i}]: {len(entry.top_logprobs)} top_logprobs > 3")
            for j, top in enumerate(entry.top_logprobs):
                check_entry(f"content[{i}].top_logprobs[{j}]", top)
        tokens = [e.token for e in lp.content]
        return f"{len(tokens)} tokens {tokens}"

    # 8
    def bad_image(self) -> str:
        url = "data:image/png;base64," + base64.b64encode(b"not a picture").decode("ascii")
        try:
            self.chat([{"role": "user", "content": [image_part(url), text_part(Q_CROSS)]}], max_tokens=8)
        except openai.BadRequestError as e:
            expect(e.status_code == 400, f"status {e.status_code}")
            code = error_code(e)
            expect(code == "invalid_image_format", f"code {code!r}, body {e.body!r}")
            return f"400 {code}"
        raise CheckFailed("no BadRequestError")

    # 9
    def unsupported_params(self) -> str:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        cases = [("tools", {"tools": tools}), ("response_format", {"response_format": {"type": "json_object"}})]
        seen = []
        for param, kwargs in cases:
            try:
                self.chat(self.cross_messages(), max_tokens=8, **kwargs)
            except openai.BadRequestError as e:
                expect(e.param == param, f"{param}: error param {e.param!r}, body {e.body!r}")
                seen.append(f"{param}: 400 {error_code(e)}")
            else:
                raise CheckFailed(f"{param}: no BadRequestError")
        return "; ".join(seen)

    # 10
    def raw_http(self) -> str:
        def request(method: str, url: str, headers: dict | None = None):
            req = urllib.request.Request(url, method=method, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=RAW_TIMEOUT_S) as resp:
                    return resp.status, resp.headers, resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()

        def expect_json_error(what: str, status: int, want: int, headers, body: bytes) -> None:
            expect(status == want, f"{what}: status {status}, want {want}, body {body[:200]!r}")
            ctype = headers.get("content-type", "")
            expect("application/json" in ctype, f"{what}: content-type {ctype!r}")
            try:
                doc = json.loads(body)
            except ValueError:
                raise CheckFailed(f"{what}: body is not JSON: {body[:200]!r}")
            expect(
                isinstance(doc, dict) and isinstance(doc.get("error"), dict),
                f"{what}: body is not {{\"error\": {{...}}}}: {doc!r}",
            )

        status, headers, body = request("GET", self.base_url + "/nope")
        expect_json_error("GET /v1/nope", status, 404, headers, body)
        status, headers, body = request("GET", self.base_url + "/chat/completions")
        expect_json_error("GET /v1/chat/completions", status, 405, headers, body)
        status, headers, body = request(
            "OPTIONS",
            self.base_url + "/chat/completions",
            {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"},
        )
        allow = headers.get("access-control-allow-origin")
        expect(200 <= status < 300, f"OPTIONS preflight: status {status}, body {body[:200]!r}")
        expect(allow == CORS_ORIGIN, f"OPTIONS preflight: access-control-allow-origin {allow!r}")
        return f"404, 405, preflight {status} allow-origin {allow}"

    def all(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("1 models", self.models),
            ("2 image_chat", self.image_chat),
            ("3 text_only_chat", self.text_only_chat),
            ("4 two_images", self.two_images),
            ("5 follow_up", self.follow_up),
            ("6 streaming", self.streaming),
            ("7 logprobs", self.logprobs),
            ("8 bad_image", self.bad_image),
            ("9 unsupported_params", self.unsupported_params),
            ("10 raw_http", self.raw_http),
        ]


def run_checks(base_url: str) -> tuple[int, int]:
    """Runs every check, printing one PASS/FAIL line each; returns (failed, total)."""
    checks = Checks(base_url)
    failed = 0
    for name, check in checks.all():
        t0 = time.monotonic()
        try:
            detail = check()
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            continue
        except openai.APIStatusError as e:
            failed += 1
            print(f"FAIL {name}: HTTP {e.status_code} {e.body!r}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - report any other error as this check's failure
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            continue
        print(f"PASS {name}: {detail} ({time.monotonic() - t0:.1f} s)", flush=True)
    return failed, len(checks.all())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1",
                        help="the server's OpenAI base URL (ignored with --start)")
    parser.add_argument("--start", metavar="BINARY",
                        help="start `BINARY serve` on a free port from the repository root, check it, stop it")
    args = parser.parse_args()

    server = None
    failed = 1  # until the checks have run
    try:
        if args.start:
            server = Server(args.start)
            server.start()
            base_url = server.base_url
        else:
            base_url = args.base_url
            wait_for_health(health_url(base_url), None, 10)
        print(f"checking {base_url} with openai {openai.__version__}", flush=True)
        failed, total = run_checks(base_url)
    except (RuntimeError, OSError) as e:  # the server did not start or is not reachable
        print(f"FAIL setup: {e}", flush=True)
        if server is not None and server.log_tail():
            print(server.log_tail(), flush=True)
        return 2
    finally:
        if server is not None:
            server.stop(keep_log=failed > 0)
    print(f"{total - failed}/{total} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
