"""The system prompts the gateway adds, versioned in the MLflow Prompt Registry.

- One prompt per model Keel answers for itself: `keel/rag` is `keel-rag`, `keel/auto` is `keel-auto`,
  and so on for every alias. keel-rag has a built-in text (`RAG_PROMPT`, version 1 once seeded); an
  alias has none, so nothing is added to its requests until an operator registers one.
- Every version is a variant, in the pool until it is retired (its evaluation regressed, or an
  operator says so): the version tag `keel.pool` = `out`, with the reason in `keel.pool.reason`.
- MLflow keeps a prompt as a registered model tagged `mlflow.prompt.is_prompt` = `true`, and each
  version as a model version whose tag `mlflow.prompt.text` holds the template. The gateway reads
  them through the REST API (`PromptSource`: it does not import mlflow); writing uses mlflow itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keel.routing import ALIASES

RAG = "keel-rag"
PROMPTS = {model: model.replace("/", "-") for model in ALIASES}  # keel/rag -> keel-rag, keel/auto -> keel-auto...
RAG_PROMPT = (
    "Answer the user's question from the context below. Cite the passages you use as [1], [2]. "
    "If the context does not hold the answer, say so.\n\n"
)
BUILTIN = {RAG: RAG_PROMPT}  # what a prompt is with no version in the pool (or no registry at all)
POOL_TAG = "keel.pool"  # `out` on a retired version
REASON_TAG = "keel.pool.reason"
IS_PROMPT_TAG = "mlflow.prompt.is_prompt"  # MLflow's own (mlflow.prompt.constants), read over REST
TEXT_TAG = "mlflow.prompt.text"
TYPE_TAG = "_mlflow_prompt_type"  # `text`, or `chat` for a list of messages (not a system prompt)


def prompt_name(model: str) -> str | None:
    """The prompt of a Keel model (`keel/rag` -> `keel-rag`); None for any other model."""
    return PROMPTS.get(model)


@dataclass(frozen=True)
class Variant:
    """One version of a prompt. Version 0 is the built-in text, used where the registry has none."""

    prompt: str
    version: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.prompt}@{self.version or 'builtin'}"


def builtin(prompt: str) -> Variant | None:
    text = BUILTIN.get(prompt)
    return None if text is None else Variant(prompt, 0, text)


# -- writing: mlflow's client (the CLI, `keel up`, DAG tasks) ----------------------------------------


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _check(prompt: str) -> None:
    from keel.errors import InvalidParameterError

    if prompt not in PROMPTS.values():
        raise InvalidParameterError(f"{prompt} is not a Keel prompt (one of {', '.join(PROMPTS.values())})")


def seed(tracking_uri: str) -> int | None:
    """Register keel-rag's built-in text as its version 1 unless keel-rag exists. Returns the version
    made, None when there was one already."""
    c = _client(tracking_uri)
    if c.get_prompt(RAG) is not None:
        return None
    return int(c.register_prompt(RAG, RAG_PROMPT, commit_message="Keel's built-in RAG prompt").version)


def register(tracking_uri: str, prompt: str, template: str, commit_message: str) -> int:
    """A new version of `prompt`, in the pool from the gateways' next refresh. Returns its number.
    keel-rag is seeded first, so that its built-in text stays in the pool, as version 1, to compete."""
    from keel.errors import InvalidParameterError

    _check(prompt)
    if not template.strip():
        raise InvalidParameterError("a prompt's text cannot be empty")
    if prompt == RAG:
        seed(tracking_uri)
    return int(_client(tracking_uri).register_prompt(prompt, template, commit_message=commit_message).version)


def retire(tracking_uri: str, prompt: str, version: int, reason: str) -> None:
    """Take a version out of the pool (it regressed, or an operator says so); `restore` brings it back."""
    _check(prompt)
    c = _client(tracking_uri)
    _version(c, prompt, version)
    c.set_prompt_version_tag(prompt, version, REASON_TAG, reason[:500])  # first: `out` is never without it
    c.set_prompt_version_tag(prompt, version, POOL_TAG, "out")


def restore(tracking_uri: str, prompt: str, version: int) -> None:
    _check(prompt)
    c = _client(tracking_uri)
    tags = _version(c, prompt, version).tags
    for key in (POOL_TAG, REASON_TAG):
        if key in tags:
            c.delete_prompt_version_tag(prompt, version, key)


def _version(c: Any, prompt: str, version: int) -> Any:
    from mlflow.exceptions import MlflowException

    from keel.errors import NotFoundError

    try:
        return c.get_prompt_version(prompt, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such prompt, or no such version of it
            raise NotFoundError(f"{prompt} has no version {version}") from e
        raise


# -- reading: the REST API (the gateway) -------------------------------------------------------------


def source_for(tracking_uri: str | None) -> PromptSource | None:
    """A reader of the prompts where MLflow is a server; None otherwise (built-in texts only)."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return PromptSource(tracking_uri)
    return None


class PromptSource:
    """The versions in the pool of each Keel prompt, from an MLflow tracking server. Raises when the
    server cannot be read (the board keeps its last read)."""

    def __init__(self, tracking_uri: str, timeout_s: float = 5.0) -> None:
        import httpx

        self.api = tracking_uri.rstrip("/") + "/api/2.0/mlflow"
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def pools(self, prompts: Sequence[str] = tuple(PROMPTS.values())) -> dict[str, list[Variant]]:
        """Each prompt's versions in the pool, oldest first; [] for a prompt not registered."""
        return {p: [v for v, out in found if out is None] for p, found in self.versions(prompts).items()}

    def versions(self, prompts: Sequence[str] = tuple(PROMPTS.values())) -> dict[str, list[tuple[Variant, str | None]]]:
        """Each prompt's versions, oldest first, with the reason each retired one is out (None: in)."""
        names = ", ".join(f"'{p}'" for p in prompts)
        params: dict[str, Any] = {"filter": f"name IN ({names}) AND tag.`{IS_PROMPT_TAG}` = 'true'",
                                  "max_results": 1000}
        out: dict[str, list[tuple[Variant, str | None]]] = {p: [] for p in prompts}
        while True:
            r = self._http.get(f"{self.api}/model-versions/search", params=params)
            r.raise_for_status()
            body = r.json()
            for mv in body.get("model_versions", []):
                tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
                if tags.get(TYPE_TAG, "text") != "text" or not tags.get(TEXT_TAG):
                    continue  # a chat template (a list of messages) is no system prompt
                retired = (tags.get(REASON_TAG) or "retired") if tags.get(POOL_TAG) == "out" else None
                out[mv["name"]].append((Variant(mv["name"], int(mv["version"]), tags[TEXT_TAG]), retired))
            if not body.get("next_page_token"):
                break
            params["page_token"] = body["next_page_token"]
        for found in out.values():
            found.sort(key=lambda f: f[0].version)
        return out


def parse_id(variant: str) -> tuple[str, int]:
    """`keel-rag@2` -> ("keel-rag", 2); a 400 naming the form for anything else."""
    from keel.errors import InvalidParameterError

    name, _, version = variant.partition("@")
    if name not in PROMPTS.values() or not version.isdigit() or int(version) < 1:
        raise InvalidParameterError(f"{variant!r} is not a prompt variant: <prompt>@<version>, the prompt one of "
                                    f"{', '.join(PROMPTS.values())}", param="x-keel-prompt")
    return name, int(version)


def model_of(prompt: str) -> str:
    """The Keel model whose requests get this prompt (`keel-rag` -> `keel/rag`)."""
    return next(model for model, name in PROMPTS.items() if name == prompt)


def pools(tracking_uri: str | None) -> dict[str, list[Variant]]:
    """Every prompt's pool as the gateway reads it, once; {} without a tracking server."""
    source = source_for(tracking_uri)
    if source is None:
        return {}
    try:
        return source.pools()
    finally:
        source.close()
