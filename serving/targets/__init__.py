"""Model targets behind one protocol (serving.targets.base.Target); a new backend is one module here."""

from __future__ import annotations

from typing import Any

from keel.policy import ModelTarget
from serving.targets.base import Target


def deployment_for(config: ModelTarget) -> Any | None:
    """The Ray Serve application a target needs inside the cluster (None for external endpoints)."""
    if config.kind == "llama_cpp":
        from serving.targets import llama_cpp

        return llama_cpp.deployment(config)
    if config.kind == "vllm":
        from serving.targets import vllm

        return vllm.deployment(config)
    return None


def make_target(config: ModelTarget, handle: Any, gateway: Any) -> Target:
    """The gateway's side of a target; `handle` is its deployment's handle for in-cluster kinds."""
    if config.kind == "openai":
        from serving.targets.openai_http import OpenAIHTTPTarget

        return OpenAIHTTPTarget(config, gateway.connect_timeout_s)
    if handle is None:
        raise ValueError(f"target {config.name}: kind {config.kind} needs its deployment")
    if config.kind == "llama_cpp":
        from serving.targets.llama_cpp import LlamaCppTarget

        return LlamaCppTarget(config, handle)
    from serving.targets.vllm import VLLMTarget

    return VLLMTarget(config, handle)
