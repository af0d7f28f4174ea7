"""The OpenAI chat-completions format, as far as PaliGemma can honour it: request parsing and
validation (each problem one `ApiError`, one line naming the field and the fix), and the bodies
of responses, stream chunks and errors.

PaliGemma is not a chat model: a request is one image and one task prompt ("caption en",
"detect cat", "answer en what is this?"). So a request carries exactly one user message whose
content has one `text` part and one `image_url` part; everything that assumes a conversation
(several turns, a system prompt, tools, several choices) is refused with a 400 that says so.

    >>> chat = parse_chat_request({"messages": [{"role": "user", "content": [
    ...     {"type": "text", "text": "caption en"},
    ...     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}, max_new_tokens=128)
    >>> chat.prompt, chat.max_tokens, chat.sampling
    ('caption en', 128, None)

Extensions (fields OpenAI does not have, as vLLM spells them): `top_k`, `ignore_eos` in the
request; `detections` (pixel boxes of a `detect` prompt) in `choices[0].message` and in the last
stream chunk's `delta`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pgexport.processing.detection import parse_detections
from pgexport.runtime.generation import Sampling

ONE_REQUEST = ("send one user message whose content is one text part (the task prompt, e.g. \"caption en\", "
               "\"detect cat\", \"answer en what is this?\") and one image_url part")
NOT_CHAT = f"PaliGemma is not a chat model: {ONE_REQUEST}"
MAX_STOP = 4  # as OpenAI

# status -> OpenAI's error "type"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error with OpenAI's error body; `message` is one line naming the problem and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    @property
    def message(self) -> str:
        return str(self)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request."""

    prompt: str  # the PaliGemma task prompt
    image_url: str  # data:, file:// (checked later, in media.py)
    max_tokens: int
    sampling: Sampling | None  # None: greedy
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    model: str | None

    @property
    def is_detection(self) -> bool:
        return self.prompt.lstrip().startswith("detect")


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, name: str, low: float, high: float | None, integer: bool = False):
    """body[name] if it is a number in [low, high] (high None: no upper bound), None if absent."""
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or value < low
            or (high is not None and value > high)):
        kind = "an integer" if integer else "a number"
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise bad(f"{name} must be {kind} {bounds}, got {json.dumps(value)}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    """Fields that ask for what PaliGemma cannot do, refused unless left at their default."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"{name}: {NOT_CHAT}; it calls no tools", name, "unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad(f"{name}: {NOT_CHAT}; it calls no tools", name, "unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n={json.dumps(n)}: this server returns one choice per request; send n=1 (or leave it out) "
                  "and send several requests for several answers", "n", "unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not returned by this server; leave logprobs and top_logprobs out", "logprobs",
                  "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported; leave it out (or 0)", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported; leave it out", "logit_bias", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad("response_format: PaliGemma answers in its own task formats (text, <loc> boxes); leave "
                  "response_format out", "response_format", "unsupported_parameter")
    for name in ("audio", "prediction"):
        if body.get(name):
            raise bad(f"{name} is not supported; leave it out", name, "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise bad("modalities: this server answers in text only; leave modalities out", "modalities",
                  "unsupported_parameter")


def _content_parts(messages) -> tuple[str, str]:
    """(prompt, image url) of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages must be a non-empty list; {ONE_REQUEST}", "messages")
    # A system/developer message with no content (some clients always send one) says nothing.
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer")
                                         and not m.get("content"))]
    roles = [m.get("role") if isinstance(m, dict) else None for m in turns]
    if roles != ["user"]:
        got = ", ".join(str(r) for r in roles) or "none"
        raise bad(f"messages hold {got}; {NOT_CHAT} (no system prompt, no earlier turns)", "messages",
                  "unsupported_conversation")
    content = turns[0].get("content")
    if isinstance(content, str):
        raise bad(f"the user message is text only; {ONE_REQUEST}", "messages[0].content", "image_required")
    if not isinstance(content, list):
        raise bad(f"the user message's content must be a list of parts; {ONE_REQUEST}", "messages[0].content")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text"))
        elif kind == "image_url":
            image = part.get("image_url")
            images.append(image.get("url") if isinstance(image, dict) else image)
        else:
            raise bad(f"content part of type {json.dumps(kind)} is not supported; {ONE_REQUEST}",
                      "messages[0].content", "unsupported_content")
    if len(images) != 1:
        raise bad(f"the message has {len(images)} images; PaliGemma takes exactly one image per request",
                  "messages[0].content", "image_required" if not images else "too_many_images")
    if len(texts) != 1:
        raise bad(f"the message has {len(texts)} text parts; {ONE_REQUEST}", "messages[0].content")
    prompt, url = texts[0], images[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad(f"the text part is empty; {ONE_REQUEST}", "messages[0].content")
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a string (a data: URL)", "messages[0].content")
    return prompt, url


def parse_chat_request(body, max_new_tokens: int) -> ChatRequest:
    """Validate a decoded JSON body against what this server does; raises `ApiError` (400)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    _refuse_unsupported(body)
    prompt, url = _content_parts(body.get("messages"))
    # Over the cap is its own error below.
    max_tokens = _number(body, "max_completion_tokens", 1, None, integer=True)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _number(body, "max_tokens", 1, None, integer=True), "max_tokens"
    if max_tokens is None:
        max_tokens = max_new_tokens
    elif max_tokens > max_new_tokens:
        raise bad(f"{name}={max_tokens} is over this server's cap of {max_new_tokens} (--max-new-tokens); "
                  f"ask for at most {max_new_tokens}", name, "max_tokens_too_large")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise bad("top_p must be above 0 (1 keeps every token)", "top_p")
    top_k = _number(body, "top_k", -1, None, integer=True)  # -1 or 0: off (vLLM's spelling)
    seed = _number(body, "seed", 0, 2**63 - 1, integer=True)
    # OpenAI's default temperature is 1; PaliGemma's tasks are decoded greedily, as `pgexport
    # generate` does, so leaving it out (or 0) means greedy.
    sampling = None
    if temperature:
        sampling = Sampling(do_sample=True, temperature=float(temperature), top_p=top_p,
                            top_k=top_k if top_k and top_k > 0 else None,
                            seed=seed)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if (not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object, e.g. {\"include_usage\": true}", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    ignore_eos = body.get("ignore_eos") or False
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string (GET /v1/models lists it)", "model")
    return ChatRequest(prompt, url, max_tokens, sampling, stop, stream, include_usage, ignore_eos, model)


# ----------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def detections_field(text: str, width: int, height: int) -> list[dict]:
    """`detect` answers as boxes in the request image's pixels: [{"label", "box": [x0, y0, x1, y1]}]."""
    return [{"label": d.label, "box": [round(float(v), 2) for v in d.box]}
            for d in parse_detections(text, width, height)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, detections: list[dict] | None) -> dict:
    message = {"role": "assistant", "content": text}
    if detections is not None:
        message["detections"] = detections
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               include_usage: bool = False) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if include_usage:
        chunk["usage"] = None  # as OpenAI: null on every chunk but the last, usage-only one
    return chunk


def usage_chunk_body(cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: JSON` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n".encode()
