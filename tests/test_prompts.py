"""Prompt variants in a real MLflow Prompt Registry: written with mlflow, read back over REST as the
gateway reads them, and chosen among by a `VariantBoard` fed with feedback counts."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keel.errors import InvalidParameterError, NotFoundError
from keel.feedback import prompts
from keel.feedback.bandit import Arm
from keel.feedback.prompts import RAG, RAG_PROMPT, PromptSource, Variant
from keel.feedback.variants import VariantBoard
from keel.processes import free_port
from tests.support.services import start_mlflow, write_config


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, url = start_mlflow(Path(tmp_path_factory.mktemp("prompts")) / "mlflow")
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def url(mlflow_url: str) -> Iterator[str]:
    """The module's server, with no Keel prompt in it at the start of each test."""
    from mlflow import MlflowClient

    yield mlflow_url
    c = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    for name in prompts.PROMPTS.values():
        if c.get_prompt(name) is not None:
            c.delete_prompt(name)


def pools(url: str) -> dict[str, list[Variant]]:
    source = PromptSource(url)
    try:
        return source.pools()
    finally:
        source.close()


def test_names() -> None:
    assert [prompts.prompt_name(m) for m in ("keel/rag", "keel/auto", "keel/fast", "keel/cheap", "keel/smart")] == [
        "keel-rag", "keel-auto", "keel-fast", "keel-cheap", "keel-smart"]
    assert prompts.prompt_name("llama-local") is None
    assert Variant(RAG, 2, "x").id == "keel-rag@2"
    assert prompts.builtin(RAG) == Variant(RAG, 0, RAG_PROMPT) and prompts.builtin("keel-auto") is None
    assert prompts.parse_id("keel-smart@12") == ("keel-smart", 12) and prompts.model_of("keel-smart") == "keel/smart"
    for bad in ("keel-rag@builtin", "keel-rag", "other@1", "keel-rag@0"):
        with pytest.raises(InvalidParameterError, match="not a prompt variant"):
            prompts.parse_id(bad)
    assert prompts.pools(None) == {}


def test_seed_is_idempotent_and_register_adds_versions(url: str) -> None:
    assert pools(url) == {name: [] for name in prompts.PROMPTS.values()}  # nothing registered: no variants
    assert prompts.seed(url) == 1
    assert prompts.seed(url) is None
    assert prompts.register(url, RAG, "Answer from the context, citing [n].\n\n", "shorter") == 2
    assert prompts.register(url, "keel-auto", "Be brief.", "first") == 1
    found = pools(url)
    assert found[RAG] == [Variant(RAG, 1, RAG_PROMPT), Variant(RAG, 2, "Answer from the context, citing [n].\n\n")]
    assert found["keel-auto"] == [Variant("keel-auto", 1, "Be brief.")]
    assert found["keel-fast"] == found["keel-cheap"] == found["keel-smart"] == []


def test_retire_takes_a_version_out_and_restore_brings_it_back(url: str) -> None:
    from mlflow import MlflowClient

    prompts.seed(url)
    prompts.register(url, RAG, "variant two", "two")
    prompts.register(url, RAG, "variant three", "three")
    prompts.retire(url, RAG, 2, "faithfulness fell 0.91 -> 0.74 in run abc")
    assert [v.version for v in pools(url)[RAG]] == [1, 3]
    assert [v.version for v in prompts.pools(url)[RAG]] == [1, 3]
    tags = MlflowClient(tracking_uri=url, registry_uri=url).get_prompt_version(RAG, 2).tags
    assert (tags["keel.pool"], tags["keel.pool.reason"]) == ("out", "faithfulness fell 0.91 -> 0.74 in run abc")
    prompts.restore(url, RAG, 2)
    prompts.restore(url, RAG, 3)  # in the pool already: nothing to do
    assert [v.version for v in pools(url)[RAG]] == [1, 2, 3]


def test_bad_names_and_versions_are_refused(url: str) -> None:
    with pytest.raises(InvalidParameterError, match="not a Keel prompt"):
        prompts.register(url, "my-prompt", "text", "m")
    with pytest.raises(InvalidParameterError, match="cannot be empty"):
        prompts.register(url, RAG, "  ", "m")
    with pytest.raises(NotFoundError, match="keel-rag has no version 1"):
        prompts.retire(url, RAG, 1, "r")  # no such prompt yet
    prompts.seed(url)
    with pytest.raises(NotFoundError, match="keel-rag has no version 7"):
        prompts.restore(url, RAG, 7)


def test_the_cli_adds_retires_restores_and_lists(url: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from keel.cli import app

    cfg = str(write_config(tmp_path, mlflow_tracking_uri=url))
    (tmp_path / "v.txt").write_text("Answer in one sentence, citing [n].\n")
    cli = CliRunner()

    def keel(*args: str) -> str:
        r = cli.invoke(app, ["prompts", *args, "-c", cfg])
        assert r.exit_code == 0, r.output
        return r.output

    assert "keel-rag@2 registered" in keel("add", "keel/rag", str(tmp_path / "v.txt"), "-m", "one sentence")
    assert [v.version for v in pools(url)[RAG]] == [1, 2]  # adding to keel-rag seeded its built-in text first
    assert "keel-rag@1 is out of the pool" in keel("retire", "keel-rag", "1", "--reason", "too long")
    listed = keel("list")
    assert "keel-rag@1       out: too long" in listed and "keel-rag@2       in the pool" in listed
    assert "keel-auto:\n  no version in the pool: nothing is added to its requests" in listed
    assert "keel-rag@1 is in the pool again" in keel("restore", "keel/rag", "1")
    r = cli.invoke(app, ["prompts", "retire", "keel-rag", "9", "-r", "x", "-c", cfg])
    assert (r.exit_code, r.output.strip()) == (1, "keel prompts retire: keel-rag has no version 9")


def test_an_unreachable_server_raises() -> None:
    source = PromptSource(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    with pytest.raises(httpx.ConnectError):
        source.pools()
    source.close()
    assert prompts.source_for(None) is None and prompts.source_for("file:///tmp/mlruns") is None


def test_the_board_chooses_among_the_pool_with_the_feedback_it_reads(url: str) -> None:
    prompts.seed(url)
    prompts.register(url, RAG, "variant two", "two")
    prompts.register(url, "keel-smart", "Think step by step.", "one")
    counts = {(RAG, 1): Arm(2, 40), (RAG, 2): Arm(40, 2)}
    board = VariantBoard(PromptSource(url), lambda: counts, refresh_s=0.2, rng=random.Random(3))  # noqa: S311
    try:
        deadline = time.monotonic() + 10
        while board.updated_at is None and time.monotonic() < deadline:  # its thread's first read
            time.sleep(0.05)
        assert board.error is None
        picks = [board.choose(RAG) for _ in range(100)]
        assert {v.id for v in picks if v} == {"keel-rag@2"}  # the one users rate up
        assert board.choose("keel-smart") == Variant("keel-smart", 1, "Think step by step.")
        assert board.choose("keel-auto") is None
        assert board.pinned(RAG, 1) == Variant(RAG, 1, RAG_PROMPT) and board.pinned(RAG, 9) is None
        assert board.public()["prompts"][RAG][1] == {"id": "keel-rag@2", "version": 2, "alpha": 41.0, "beta": 3.0,
                                                     "expected": 0.932}

        prompts.retire(url, RAG, 2, "regressed")
        board.refresh()
        assert {board.choose(RAG) for _ in range(20)} == {Variant(RAG, 1, RAG_PROMPT)}
        prompts.retire(url, RAG, 1, "regressed")  # the whole pool out: the built-in text answers
        board.refresh()
        assert board.choose(RAG) == Variant(RAG, 0, RAG_PROMPT)
    finally:
        board.close()


def test_the_evaluation_dag_plans_one_job_per_variant_of_a_pool_with_more_than_one(url: str,
                                                                                   tmp_path: Path) -> None:
    from keel.orchestration.evaluate import jobs
    from keel.settings import load_settings

    settings = load_settings(write_config(tmp_path, mlflow_tracking_uri=url))
    prompts.register(url, "keel-rag", "Answer from the context, citing [n].\n\n", "a second RAG variant")  # v2
    prompts.register(url, "keel-fast", "Be quick.", "keel/fast's only variant")
    sets = ["rag", "safety", "privacy"]
    planned = jobs(settings, ["keel/auto"], sets, ["*"])
    assert planned == [{"target": "keel/auto", "sets": sets, "prompt": None},
                       {"target": "keel/auto", "sets": ["rag"], "prompt": "keel-rag@1"},
                       {"target": "keel/auto", "sets": ["rag"], "prompt": "keel-rag@2"}]  # keel-fast has one
    assert jobs(settings, ["keel/auto"], ["safety"], ["keel-fast@1", "keel-rag@2"]) == [
        {"target": "keel/auto", "sets": ["safety"], "prompt": None},
        {"target": "keel/fast", "sets": ["safety"], "prompt": "keel-fast@1"}]  # keel-rag asks the rag set only
    assert jobs(settings, ["keel/auto"], sets, []) == [{"target": "keel/auto", "sets": sets, "prompt": None}]
