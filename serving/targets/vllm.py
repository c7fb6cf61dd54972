"""vLLM on GPUs through Ray Serve LLM's own server deployment (`ray.serve.llm`).

Ray Serve LLM routes by model id only and has no cross-model failover, so Keel's gateway stays
the ingress and calls the LLMServer deployment through a handle like any other target.
Needs the `gpu` extra (vllm) and a GPU in the Ray cluster.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, cast

from pydantic import Field
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from keel.policy import ModelTarget
from keel.settings import GatewaySettings
from keel.target_kinds import TargetKind
from serving.targets.base import Chunk, Kind, TargetError, TargetOptions, chunk_from_event


class VLLMOptions(TargetOptions):
    model: str = Field(min_length=1, description="the model source: a hub id or a local folder")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments, e.g. max_model_len")
    accelerator_type: str | None = Field(None, min_length=1, description="e.g. H100")
    replicas: int = Field(1, ge=1)


def deployment(config: ModelTarget, options: VLLMOptions) -> serve.Application:
    from ray.serve.llm import LLMConfig, build_llm_deployment

    llm_config = LLMConfig(
        model_loading_config={"model_id": config.name, "model_source": options.model},
        engine_kwargs=dict(options.engine_kwargs),
        deployment_config={"num_replicas": options.replicas},
        **({"accelerator_type": options.accelerator_type} if options.accelerator_type else {}),
    )
    return build_llm_deployment(llm_config, name_prefix=f"vllm-{config.name}-".replace("/", "-"))


class VLLMTarget:
    def __init__(self, config: ModelTarget, options: VLLMOptions, handle: DeploymentHandle[Any],
                 gateway: GatewaySettings) -> None:
        self.config = config
        self.handle = handle.options(stream=True)

    def continuation(self, kind: Kind, body: dict[str, Any], sent: str) -> dict[str, Any]:
        if kind == "completion":
            return {**body, "prompt": body["prompt"] + sent}
        # vLLM can prefill: the partial answer stays the open assistant turn and the model goes on.
        return {**body, "messages": [*body["messages"], {"role": "assistant", "content": sent}],
                "continue_final_message": True, "add_generation_prompt": False}

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        payload = {**body, "model": self.config.name, "stream": True, "stream_options": {"include_usage": True}}
        req = ChatCompletionRequest(**payload) if kind == "chat" else CompletionRequest(**payload)
        method = self.handle.chat if kind == "chat" else self.handle.completions
        try:
            async for part in cast(DeploymentResponseGenerator[Any], method.remote(req)):
                for line in (part if isinstance(part, str) else "").splitlines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        status = int(event["error"].get("code") or 500)
                        raise TargetError("client" if 400 <= status < 500 and status != 429 else "server",
                                          str(event["error"].get("message")), status=status, body=event)
                    yield chunk_from_event(kind, event)
                if not isinstance(part, str) and getattr(part, "error", None):
                    raise TargetError("server", str(part.error))
        except TargetError:
            raise
        except Exception as e:
            raise TargetError("server", f"{self.config.name}: {type(e).__name__}: {e}"[:500]) from e

    async def aclose(self) -> None:
        return None


KIND = TargetKind(name="vllm", external=False, options=VLLMOptions, target=VLLMTarget, deployment=deployment,
                  supports=frozenset({"tools", "response_format", "images"}))
