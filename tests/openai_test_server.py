"""A small OpenAI-compatible chat-completions server for engine tests.

Runs ``http.server`` in a thread on a free loopback port. ``/v1/chat/completions`` checks
the request the way EGM is served (one user message, image data URL first, then text) and
answers in EGM format; the reasoning names the image size it received so tests can check
client-side downscaling. Each answer carries per-token log-probs (byte-exact, with
multi-byte characters split over tokens like a byte-level BPE does).

Faults are set on :class:`ServerBehavior` (and may be changed while the server runs).
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

DATA_URL_PREFIX = "data:image/jpeg;base64,"


@dataclass
class ServerBehavior:
    #: the served model id; chat requests naming another model get 404, as vLLM answers them
    model: str = "egm-test"
    #: ``root`` of the model in /v1/models (vLLM: the checkpoint path or hub id behind the served name)
    root: str | None = None
    #: when set, requests must carry ``Authorization: Bearer <api_key>`` (else 401 echoing the header)
    api_key: str | None = None
    #: the first N chat calls answer ``fail_status`` (500, 429, ...)
    fail_first: int = 0
    fail_status: int = 500
    #: the first N chat calls get their connection closed without an answer
    drop_first: int = 0
    #: the first N chat calls get a 200 with a body that is not JSON
    malformed_first: int = 0
    #: prompt substring -> HTTP status returned on every call with that prompt (the body echoes
    #: the request's Authorization header, as a careless proxy might)
    fail_prompts: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    #: each chat call waits (up to hold_timeout_s) until this many calls are in flight
    hold_until_in_flight: int = 0
    hold_timeout_s: float = 5.0
    #: answer like vLLM with a reasoning parser: reasoning_content + content
    reasoning_split: bool = False
    include_logprobs: bool = True
    #: add a scored end-of-turn token that the text leaves out (as vLLM does)
    trailing_eos: bool = False


@dataclass
class ServerStats:
    chat_calls: int = 0
    model_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    #: bodies of valid chat requests, the image replaced by its decoded size
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)


def tokenize(text: str) -> list[tuple[str, bytes]]:
    """Split ``text`` into word / space / punctuation tokens; a non-ASCII character becomes
    one token per UTF-8 byte, whose token string is U+FFFD unless it completes the character."""
    out: list[tuple[str, bytes]] = []
    for piece in re.findall(r"\s+|[A-Za-z0-9_]+|[^\sA-Za-z0-9_]", text):
        raw = piece.encode("utf-8")
        if len(raw) == len(piece):
            out.append((piece, raw))
        else:
            out.extend(("\ufffd", bytes([b])) for b in raw)
    return out


def egm_answer(width: int, height: int, prompt: str) -> tuple[str, str]:
    """(reasoning, answer) of an EGM-format completion that names the received image size."""
    label = re.sub(r"^Locate\s+|,\s*output.*$", "", prompt, flags=re.S).strip() or "object"
    reasoning = f"Received image {width}x{height} for: {prompt}"
    answer = "```json\n[\n\t" + json.dumps({"bbox_2d": [100, 200, 300, 400], "label": label},
                                            ensure_ascii=False) + "\n]\n```"
    return reasoning, answer


def _validate(body: Any) -> tuple[str, Image.Image]:
    """(prompt, image) from a chat request, or ValueError naming what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body is not an object")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1:
        raise ValueError("expected exactly one message (no system prompt)")
    message = messages[0]
    if message.get("role") != "user" or not isinstance(message.get("content"), list):
        raise ValueError("expected a user message with content parts")
    parts = message["content"]
    if len(parts) != 2 or parts[0].get("type") != "image_url" or parts[1].get("type") != "text":
        raise ValueError("expected [image_url, text] content, image first")
    url = parts[0].get("image_url", {}).get("url", "")
    if not url.startswith(DATA_URL_PREFIX):
        raise ValueError("image is not a JPEG data URL")
    image = Image.open(io.BytesIO(base64.b64decode(url[len(DATA_URL_PREFIX):], validate=True)))
    image.load()
    prompt = parts[1].get("text")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("text part is empty")
    if body.get("logprobs") is not True or not isinstance(body.get("max_tokens"), int):
        raise ValueError("logprobs and max_tokens are required")
    return prompt, image


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_raw(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"))

    def _send_raw(self, status: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        expected = self.server.behavior.api_key
        header = self.headers.get("Authorization")
        if expected is None or header == f"Bearer {expected}":
            return True
        self._send_json(401, {"error": {"message": f"bad credentials: {header}"}})
        return False

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send_json(404, {"error": "not found"})
            return
        with self.server.lock:
            self.server.stats.model_calls += 1
        if self._authorized():
            entry = {"id": self.server.behavior.model, "object": "model", "owned_by": "egm-test-server"}
            if self.server.behavior.root:
                entry["root"] = self.server.behavior.root
            self._send_json(200, {"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            self._send_json(404, {"error": "not found"})
            return
        srv = self.server
        with srv.lock:
            srv.stats.chat_calls += 1
            call_no = srv.stats.chat_calls
            srv.stats.in_flight += 1
            srv.stats.max_in_flight = max(srv.stats.max_in_flight, srv.stats.in_flight)
            srv.stats.auth_headers.append(self.headers.get("Authorization"))
            srv.cond.notify_all()
        try:
            self._chat(raw, call_no)
        finally:
            with srv.lock:
                srv.stats.in_flight -= 1

    def _hold(self) -> None:
        behavior, srv = self.server.behavior, self.server
        if behavior.hold_until_in_flight:
            with srv.cond:
                # once the target was reached, later calls pass: the last calls of a batch
                # can never all be in flight together
                srv.cond.wait_for(lambda: srv.stats.max_in_flight >= behavior.hold_until_in_flight,
                                  timeout=behavior.hold_timeout_s)
        if behavior.delay_s:
            time.sleep(behavior.delay_s)

    def _chat(self, raw: bytes, call_no: int) -> None:
        behavior = self.server.behavior
        self._hold()
        if call_no <= behavior.drop_first:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if not self._authorized():
            return
        if call_no <= behavior.drop_first + behavior.fail_first:
            self._send_json(behavior.fail_status, {"error": {"message": "injected failure"}})
            return
        if call_no <= behavior.drop_first + behavior.fail_first + behavior.malformed_first:
            self._send_raw(200, b'{"choices": [{"message": ')
            return
        try:
            body = json.loads(raw)
            prompt, image = _validate(body)
        except Exception as exc:
            with self.server.lock:
                self.server.stats.invalid.append(str(exc))
            self._send_json(400, {"error": {"message": f"invalid request: {exc}"}})
            return
        if body.get("model") != behavior.model:
            self._send_json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                            "type": "NotFoundError", "code": 404}})
            return
        for needle, status in behavior.fail_prompts.items():
            if needle in prompt:
                self._send_json(status, {"error": {"message": f"failed for {needle}; "
                                                               f"auth was {self.headers.get('Authorization')}"}})
                return
        with self.server.lock:
            summary = {k: v for k, v in body.items() if k != "messages"}
            summary.update(prompt=prompt, image_size=image.size, image_format=image.format)
            self.server.stats.requests.append(summary)
        self._send_json(200, self._completion(body, prompt, image))

    def _completion(self, body: dict[str, Any], prompt: str, image: Image.Image) -> dict[str, Any]:
        behavior = self.server.behavior
        reasoning, answer = egm_answer(image.width, image.height, prompt)
        raw_text = reasoning + "\n</think>\n\n" + answer
        tokens = tokenize(raw_text)
        if behavior.trailing_eos:
            tokens.append(("<|im_end|>", b"<|im_end|>"))
        if behavior.reasoning_split:
            # like vLLM's Qwen3 reasoning parser: split at </think>, both halves kept verbatim
            message = {"role": "assistant", "reasoning_content": reasoning + "\n", "content": "\n\n" + answer}
        else:
            message = {"role": "assistant", "content": raw_text}
        logprobs = None
        if behavior.include_logprobs:
            logprobs = {"content": [
                {"token": tok, "logprob": -0.01 * (i % 7), "bytes": list(data), "top_logprobs": []}
                for i, (tok, data) in enumerate(tokens)
            ]}
        n = int(body.get("n") or 1)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": behavior.model,
            "choices": [{"index": i, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": image.width * image.height // 1024 + len(prompt.split()),
                      "completion_tokens": len(tokens), "total_tokens": 0},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behavior: ServerBehavior) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behavior = behavior
        self.stats = ServerStats()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)


class OpenAITestServer:
    """``with OpenAITestServer(ServerBehavior(...)) as srv: srv.base_url`` -> ``http://127.0.0.1:P/v1``."""

    def __init__(self, behavior: ServerBehavior | None = None) -> None:
        self._server = _Server(behavior or ServerBehavior())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-test-server", daemon=True)

    @property
    def behavior(self) -> ServerBehavior:
        return self._server.behavior

    @property
    def stats(self) -> ServerStats:
        return self._server.stats

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAITestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
