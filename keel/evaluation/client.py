"""The evaluation client: one golden item through the running gateway, as any client would send it.

It streams (so time to first token is the caller's, measured here), with the evaluation tenant's own
key, and records one answer as a plain dict (`Answer`), the `outputs` MLflow's scorers read. A failed
request is an answer too (its status and error code, its latency), never an exception: the error
rate is a metric, and no item is dropped.

Concurrency is bounded per evaluated model (`settings.evaluation.concurrency[_per_target]`): a CPU
model answers one request at a time, and evaluation must never starve users of it nor push it into
its 429s, however many workers MLflow's evaluation pool runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from keel.evaluation.golden import GoldenItem
from keel.settings import KeelSettings

Answer = dict[str, Any]
KEY_FILE = "evaluation_api_key"  # under the state dir


class GatewayClient:
    def __init__(self, settings: KeelSettings, base_url: str, api_key: str) -> None:
        self.s = settings.evaluation
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self.prices = {t.name: (t.price_per_1k_input, t.price_per_1k_output) for t in settings.policy.targets}
        self._limits: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=httpx.Timeout(self.s.request_timeout_s, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def limit(self, model: str) -> threading.BoundedSemaphore:
        with self._lock:
            if model not in self._limits:
                n = self.s.concurrency_per_target.get(model, self.s.concurrency)
                self._limits[model] = threading.BoundedSemaphore(n)
            return self._limits[model]

    def request(self, model: str, item: GoldenItem, set_name: str, prompt: str | None = None,
                ) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": item.question}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": self.s.max_tokens, "temperature": 0, "seed": 0,
        }
        if set_name == "rag":
            body["rag"] = True
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if item.data_class is not None:
            headers["x-keel-data-class"] = item.data_class.value
        if prompt is not None:  # a system prompt variant asked for by its id, not chosen by the gateway
            headers["x-keel-prompt"] = prompt
        return body, headers

    def ask(self, model: str, item: GoldenItem, set_name: str, prompt: str | None = None) -> Answer:
        """The item's answer from `model` (a target name or an alias), waiting for a free slot first."""
        body, headers = self.request(model, item, set_name, prompt)
        with self.limit(model):
            start = time.perf_counter()
            answer = _empty()
            try:
                with self._http.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                       headers=headers) as resp:
                    answer["status"] = resp.status_code
                    answer["request_id"] = resp.headers.get("x-request-id", "")
                    if resp.status_code != 200:
                        answer["error"] = _error_code(resp.read())
                    else:
                        self._read(resp.iter_lines(), answer, start)
            except httpx.HTTPError as e:  # the gateway unreachable or too slow: an answer with its reason
                answer["status"], answer["error"] = 0, f"client_{type(e).__name__}"
            answer["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
        return self._settle(answer)

    def complete(self, model: str, prompt: str, max_tokens: int = 8) -> str:
        """A short whole answer from `model` (the LLM judge's verdict), within the model's bound in flight."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        with self.limit(model):
            r = self._http.post(f"{self.base_url}/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {self.api_key}"})
        r.raise_for_status()  # a judge that cannot answer fails its scorer, and so the run, naming it
        return str(r.json()["choices"][0]["message"]["content"] or "")

    def _read(self, lines: Iterator[str], answer: Answer, start: float) -> None:
        parts: list[str] = []
        for line in lines:
            if not line.startswith("data:"):
                continue  # blank lines and `event:` names: the data line that follows is what counts
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:  # a failure after the stream began
                answer["error"] = (event["error"] or {}).get("code") or "stream_error"
                continue
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text and answer["ttft_ms"] is None:
                    answer["ttft_ms"] = round((time.perf_counter() - start) * 1000, 1)
                parts.append(text)
                answer["finish_reason"] = choice.get("finish_reason") or answer["finish_reason"]
            if usage := event.get("usage"):
                answer["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
                answer["completion_tokens"] = int(usage.get("completion_tokens") or 0)
            if keel := event.get("keel"):
                answer["target"] = (keel.get("route") or {}).get("target")
                answer["citations"] = keel.get("citations") or []
                answer["guard"] = keel.get("guard") or {}
                answer["model_ms"] = keel.get("model_ms")
                answer["gateway_ms"] = keel.get("keel_ms")  # the gateway's own share of keel_ms, as it measured it
                answer["request_id"] = keel.get("request_id") or answer["request_id"]
        answer["text"] = "".join(parts)

    def _settle(self, answer: Answer) -> Answer:
        """Derived numbers: Keel's own time (all but the model's) and the cost at the answering target's prices."""
        if answer["model_ms"] is not None:
            answer["keel_ms"] = round(max(0.0, answer["latency_ms"] - answer["model_ms"]), 1)
        p_in, p_out = self.prices.get(answer["target"] or "", (0.0, 0.0))
        answer["cost_usd"] = (answer["prompt_tokens"] * p_in + answer["completion_tokens"] * p_out) / 1000
        return answer


def _empty() -> Answer:
    return {"text": "", "status": 0, "error": None, "finish_reason": None, "latency_ms": 0.0, "ttft_ms": None,
            "model_ms": None, "keel_ms": None, "gateway_ms": None, "prompt_tokens": 0, "completion_tokens": 0,
            "cost_usd": 0.0, "target": None, "citations": [], "guard": {}, "request_id": ""}


def _error_code(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error") or {}
        return str(err.get("code") or err.get("type") or "error")
    except (ValueError, AttributeError):
        return "error"


def gateway_url(settings: KeelSettings) -> str:
    return settings.evaluation.gateway_url or f"http://{settings.host}:{settings.ports.gateway}/v1"


def evaluation_api_key(settings: KeelSettings) -> str:
    """The evaluation tenant's key: from the environment or a secrets dir (settings), else the one
    `keel up` keeps (0600) in <state_dir>/evaluation_api_key."""
    from keel.errors import ConfigError

    if settings.evaluation.api_key is not None:
        return settings.evaluation.api_key.get_secret_value()
    path = settings.state / KEY_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise ConfigError(f"no key for the evaluation tenant {settings.evaluation.tenant!r}: set "
                          f"KEEL_EVALUATION__API_KEY, or run `keel up`, which keeps one in {path}") from None
