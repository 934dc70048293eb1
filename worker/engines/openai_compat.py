"""Engine that sends each request to an OpenAI-compatible chat-completions server.

This is how EGM is usually served (``vllm serve``, SGLang). A batch becomes concurrent
HTTP requests (a bounded thread pool over one pooled ``httpx.Client``); each request is
one user message, image first, then the prompt, no system prompt, as EGM was evaluated.

Failures stay per request: a request that keeps failing (after retries with exponential
backoff on connection errors, 429 and 5xx) becomes ``EngineOutput.error`` while the rest
of the batch succeeds. Only a server that cannot be reached for any request of the batch
raises :class:`EngineError`. The API key is sent as a Bearer token and scrubbed from
every error and log message.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image

from egm.backoff import backoff_s
from egm.redaction import redact
from egm.worker.engines.base import DecodingConfig, Engine, EngineError, EngineOutput, EngineRequest, ServedModel
from egm.images.decode import to_rgb
from egm.worker.engines.served import align_pieces, fit_within_pixels, join_reasoning, pieces_from_bytes

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
MAX_BACKOFF_S = 30.0
_ERROR_BODY_CHARS = 300


class ResponseFormatError(ValueError):
    """The server answered 200 but not with a chat completion we understand."""


@dataclass(eq=False)
class _Failure(Exception):
    """One attempt failed. ``unreachable``: no connection could be made at all."""

    message: str
    retryable: bool
    unreachable: bool = False
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


# --- pure request / response helpers -------------------------------------------------


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1/`` both mean ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def public_url(url: str) -> str:
    """``url`` without credentials (``http://user:pass@host`` -> ``http://host``), for identities and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


def encode_image(image: Image.Image, max_pixels: int, quality: int = JPEG_QUALITY) -> str:
    """JPEG data URL of ``image`` downscaled to ``max_pixels``."""
    fitted = to_rgb(fit_within_pixels(image, max_pixels))
    buf = io.BytesIO()
    fitted.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_chat_body(model: str, prompt: str, image_url: str, decoding: DecodingConfig) -> dict[str, Any]:
    """The chat-completions request for one (image, prompt)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt},
            ],
        }],
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "max_tokens": decoding.max_new_tokens,
        # per-token log-probs of the chosen tokens feed the box confidence
        "logprobs": True,
        "top_logprobs": 0,
    }
    if decoding.top_k > 0:
        body["top_k"] = decoding.top_k  # not OpenAI's API; vLLM and SGLang read it from the body
    return body


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if content is not None and not isinstance(content, str):
        raise ResponseFormatError(f"message content is {type(content).__name__}, expected text")
    return join_reasoning(reasoning if isinstance(reasoning, str) else None, content)


def _logprob_entries(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    entries = logprobs.get("content")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return entries


def _tokens_for(text: str, entries: list[dict[str, Any]] | None) -> tuple[str, list[str] | None, list[float] | None]:
    """Per-token pieces aligned with ``text`` (see :func:`align_pieces`), else no tokens."""
    if not entries:
        return text, None, None
    try:
        logprobs = [float(e["logprob"]) for e in entries]
    except (KeyError, TypeError, ValueError):
        return text, None, None
    candidates = [[str(e.get("token", "")) for e in entries]]
    if all(isinstance(e.get("bytes"), list) for e in entries):
        # token strings show U+FFFD for halves of a multi-byte character; the bytes are exact
        candidates.append(pieces_from_bytes([bytes(e["bytes"]) for e in entries]))
    for pieces in candidates:
        aligned = align_pieces(text, pieces, logprobs)
        if aligned is not None:
            return aligned
    return text, None, None


def choice_to_output(choice: dict[str, Any]) -> EngineOutput:
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ResponseFormatError("choice has no message")
    text, tokens, logprobs = _tokens_for(_message_text(message), _logprob_entries(choice))
    extra = {"finish_reason": choice.get("finish_reason")}
    return EngineOutput(text=text, tokens=tokens, logprobs=logprobs, extra=extra)


def parse_chat_response(data: Any) -> EngineOutput:
    """EngineOutput from a chat-completions response (the first choice: one answer per request)."""
    if not isinstance(data, dict):
        raise ResponseFormatError("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise ResponseFormatError("response has no choices")
    first = choice_to_output(min(choices, key=lambda c: c.get("index") or 0))
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        first.prompt_tokens = usage["prompt_tokens"]
    return first


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _http_failure(response: httpx.Response) -> _Failure:
    status = response.status_code
    body = response.text.strip().replace("\n", " ")[:_ERROR_BODY_CHARS]
    return _Failure(f"HTTP {status} from server: {body}" if body else f"HTTP {status} from server",
                    retryable=status == 429 or status >= 500, retry_after_s=_retry_after(response))


def _transport_failure(exc: httpx.TransportError, timeout_s: float) -> _Failure:
    unreachable = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
    if isinstance(exc, httpx.TimeoutException) and not unreachable:
        # a generation that ran out of time would likely do so again: do not repeat it
        return _Failure(f"no answer within {timeout_s:g} s ({type(exc).__name__})", retryable=False)
    detail = str(exc) or type(exc).__name__
    return _Failure(f"connection error: {type(exc).__name__}: {detail}", retryable=True, unreachable=unreachable)


# --- the engine ----------------------------------------------------------------------

class OpenAICompatEngine(Engine):
    name = "openai"
    model_can_change = True

    def __init__(
        self,
        base_url: str,
        decoding: DecodingConfig,
        max_pixels: int,
        min_pixels: int = 784,
        api_key: str | None = None,
        model: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        super().__init__(decoding, max_pixels, min_pixels)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        #: EGM_OPENAI_MODEL: when set, only that model will do; else whatever the server serves.
        self.configured_model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self._api_key = api_key or None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="egm-openai")
        self._model_lock = threading.Lock()

    # -- secrets never leave this object --
    def _redact(self, message: str) -> str:
        return redact(message, [self._api_key] if self._api_key else [])

    def _backoff(self, attempt: int, failure: _Failure) -> float:
        delay = backoff_s(attempt, self.backoff_s, MAX_BACKOFF_S, jitter=0.1)
        if failure.retry_after_s is not None:
            delay = max(delay, failure.retry_after_s)
        return min(delay, MAX_BACKOFF_S)

    def _send(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """One logical call with retries; returns the decoded JSON or raises the last _Failure."""
        failure: _Failure | None = None
        for attempt in range(self.retries + 1):
            if failure is not None:
                delay = self._backoff(attempt, failure)
                log.warning("openai engine: %s %s failed (%s); retry %d/%d in %.2f s", method, url,
                            self._redact(failure.message), attempt, self.retries, delay)
                time.sleep(delay)
            try:
                response = self._client.request(method, url, json=body)
            except httpx.TransportError as exc:
                failure = _transport_failure(exc, self.timeout_s)
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        failure = _Failure("server sent malformed JSON", retryable=True)
                else:
                    failure = _http_failure(response)
            if not failure.retryable:
                break
        assert failure is not None
        raise failure

    def _list_models(self) -> list[dict[str, Any]]:
        try:
            data = self._send("GET", f"{self.base_url}/models")
        except _Failure as exc:
            raise EngineError(self._redact(f"cannot list models at {self.base_url}/models: {exc}")) from None
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise EngineError(f"{self.base_url}/models did not answer a model list")
        return [m for m in models if isinstance(m, dict) and m.get("id")]

    def served_model(self) -> ServedModel:
        """The model the server says it serves (asked every time: another model may have been put
        behind the same URL). Without EGM_OPENAI_MODEL the engine follows the server's first model."""
        from egm.identity import version_name

        models = self._list_models()
        ids = [str(m["id"]) for m in models]
        if self.configured_model:
            if self.configured_model not in ids:
                raise EngineError(f"{public_url(self.base_url)} does not serve model {self.configured_model!r} "
                                  f"(EGM_OPENAI_MODEL); it serves: {', '.join(ids) or 'nothing'}")
            entry = models[ids.index(self.configured_model)]
        elif models:
            entry = models[ids.index(self.model)] if self.model in ids else models[0]
        else:
            raise EngineError(f"{public_url(self.base_url)}/models lists no model; set EGM_OPENAI_MODEL")
        with self._model_lock:
            self.model = str(entry["id"])
        details = {"served_id": self.model, "base_url": public_url(self.base_url)}
        if isinstance(entry.get("root"), str) and entry["root"] != self.model:
            details["root"] = entry["root"]  # vLLM: the checkpoint path or hub id behind the served name
        runtime = {"library": "openai-compatible server"}
        if isinstance(entry.get("owned_by"), str):
            runtime["owned_by"] = entry["owned_by"]
        return ServedModel(name=version_name(self.model), details=details, runtime=runtime)

    def _resolve_model(self) -> str:
        """The configured model, or the first one the server lists (asked once)."""
        with self._model_lock:
            if self.model:
                return self.model
            try:
                data = self._send("GET", f"{self.base_url}/models")
            except _Failure as exc:
                raise EngineError(self._redact(f"cannot list models at {self.base_url}/models: {exc}")) from None
            models = data.get("data") if isinstance(data, dict) else None
            if not isinstance(models, list) or not models or not isinstance(models[0], dict) or not models[0].get("id"):
                raise EngineError(f"{self.base_url}/models lists no model; set EGM_OPENAI_MODEL")
            self.model = str(models[0]["id"])
            log.info("openai engine: using served model %s", self.model)
            return self.model

    def _one(self, model: str, request: EngineRequest) -> tuple[EngineOutput, bool]:
        """Run one request; returns its output and whether the server was unreachable."""
        try:
            image_url = encode_image(request.image, self.max_pixels)
        except Exception as exc:  # a broken image fails only its own request
            return EngineOutput(text="", error=f"cannot encode image: {type(exc).__name__}: {exc}"), False
        body = build_chat_body(model, request.prompt, image_url, self.decoding)
        try:
            output = parse_chat_response(self._send("POST", f"{self.base_url}/chat/completions", body))
        except _Failure as exc:
            return EngineOutput(text="", error=self._redact(f"openai request failed: {exc}")), exc.unreachable
        except ResponseFormatError as exc:
            return EngineOutput(text="", error=self._redact(f"openai response not understood: {exc}")), False
        output.extra["model"] = model
        return output, False

    def generate(self, requests: list[EngineRequest], between_steps=None) -> list[EngineOutput]:
        # between_steps is ignored: this engine cannot pause a batch (Engine.pauses is False)
        if not requests:
            return []
        model = self._resolve_model()
        results = list(self._pool.map(lambda r: self._one(model, r), requests))
        if all(unreachable for _, unreachable in results):
            raise EngineError(f"server at {self.base_url} unreachable: {results[0][0].error}")
        return [output for output, _ in results]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(base_url=self.base_url, model=self.model, concurrency=self.concurrency)
        return info

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
