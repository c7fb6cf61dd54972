"""The feedback loop's batch side: a zone's fine-tuning dataset (keel.feedback.dataset) from a real SQLite
store and the real PII engine, its versions in the zone's storage and retention; the Ray job's body and its
audit record; the feedback report (keel.feedback.report) on a real MLflow server."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from keel import audit
from keel.feedback import dataset, report
from keel.feedback.store import Exchange, Feedback, Link, open_zone
from keel.settings import load_settings
from keel.storage import ZoneStorage
from tests.support.services import start_mlflow, write_config

NOW = time.time()
DAY = 86400.0
# Values planted raw, as if the guard had missed them: none may reach the dataset.
PLANTED = ("John Smith", "maria.gonzalez@example.org", "212-555-0199", "Maria Gonzalez")
RAG = ("Answer from the context below.\n\n[1] [PERSON:7f3a9c01] approved the refund for [PERSON] on "
       "[DATE_OF_BIRTH:0a1b2c3d].")


def _messages(user: str) -> list[dict]:
    return [{"role": "system", "content": RAG}, {"role": "user", "content": user}]


# request id -> (messages, answer, ratings as (key, score, correction), expires in days, target, prompt, class)
EXCHANGES = {
    "r-up": (_messages("Email <PERSON_1> at <EMAIL_ADDRESS_1> about the refund. John Smith asked too, call him on "
                       "212-555-0199."),
             "I wrote to [PERSON_1] at <EMAIL_ADDRESS_1>; PERSON_1 will hear back.",
             [("k1", 1.0, None)], 30, "smollm2-135m-cpu", ("keel-rag", 1), "pii"),
    "r-corrected": ([{"role": "user", "content": [{"type": "text", "text": "How long do refunds take?"}]}],
                    "No idea.", [("k1", 0.0, "5-10 business days; Maria Gonzalez at maria.gonzalez@example.org "
                                             "can confirm.")], 30, "smollm2-135m-cpu", ("keel-rag", 1), "internal"),
    "r-down": (_messages("What is the policy?"), "Nothing.", [("k1", 0.0, None)], 30, "smollm2-135m-cpu",
               ("keel-rag", 2), "internal"),
    "r-split": (_messages("Is shipping free?"), "Yes, above $50.", [("k1", 1.0, None), ("k2", 0.0, None)], 30,
                "other-target", (None, None), "public"),
    "r-mostly-down": (_messages("Is it open on Sunday?"), "Yes.", [("k1", 1.0, None), ("k2", 0.0, None),
                                                                   ("k3", 0.0, None)], 30, "other-target",
                      ("keel-rag", 2), "public"),
    "r-tool": ([{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
               "It is sunny.", [("k1", 1.0, None)], 30, "smollm2-135m-cpu", (None, None), "public"),
    "r-expiring": (_messages("Hours?"), "9 to 5.", [("k1", 1.0, None)], 2, "smollm2-135m-cpu", (None, None),
                   "public"),
}
IN = ["r-up", "r-corrected", "r-split", "r-expiring"]  # in store order: created one second apart


def _fill(store, names=tuple(EXCHANGES), now=NOW, tenant="demo") -> None:
    for i, name in enumerate(names):
        messages, answer, ratings, days, target, (prompt, version), data_class = EXCHANGES[name]
        created = now - 3600 + i
        link = Link(name, tenant, "chat", "keel/rag", target, "blend", data_class, prompt, version, 200, created)
        store.add([link], [Exchange(name, tenant, data_class, "chat", messages, answer, True, created,
                                    created + days * DAY)])
        for key, score, correction in ratings:
            store.put(Feedback(name, tenant, key, score, "up" if score == 1 else "down",
                               "thanks" if correction is None else None, correction, updated_at=created + 1), link)


@pytest.fixture
def settings(tmp_path):
    """Zones whose storage (and so feedback database) is this test's own."""
    return load_settings(write_config(tmp_path))


@pytest.fixture
def zone(settings):
    """The us zone's store and storage."""
    store = open_zone(settings, "us")
    yield store, ZoneStorage.for_zone(settings, "us")
    store.close()


def test_the_dataset_holds_liked_and_corrected_exchanges_in_one_token_format_and_no_pii(zone, engine):
    store, storage = zone
    _fill(store)
    ds = dataset.build(store, engine, NOW)
    text = ds.lines.decode()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [r for _, r in ds.fields["requests"]] == IN
    # Chat format: the messages as the model saw them, then the answer to learn.
    assert all(line["messages"][-1]["role"] == "assistant" for line in lines)
    up, corrected, split, _ = lines
    assert [m["role"] for m in up["messages"]] == ["system", "user", "assistant"]
    assert corrected["messages"][0]["content"] == "How long do refunds take?"  # content parts: their text
    assert corrected["messages"][-1]["content"].startswith("5-10 business days; [PERSON] at [EMAIL_ADDRESS]")
    assert split["messages"][-1]["content"] == "Yes, above $50."  # mean 0.5: rated well
    # One token format: placeholders in any form a model wrote them, hashed tokens, typed tokens.
    assert up["messages"][-1]["content"] == "I wrote to [PERSON] at [EMAIL_ADDRESS]; [PERSON] will hear back."
    assert up["messages"][0]["content"].endswith("[1] [PERSON] approved the refund for [PERSON] on [DATE_OF_BIRTH].")
    assert up["messages"][1]["content"].startswith("Email [PERSON] at [EMAIL_ADDRESS] about the refund. [PERSON]")
    assert not re.search(r"<[A-Z_]+_\d+>|\[[A-Z_]+(_\d+|:[0-9a-f]{8})\]|\b(PERSON|EMAIL_ADDRESS)_\d", text), text
    for value in PLANTED:
        assert value not in text
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER"} <= set(ds.fields["findings"]), ds.fields["findings"]
    assert ds.fields["tokens_unified"] == {"DATE_OF_BIRTH": 3, "EMAIL_ADDRESS": 2, "PERSON": 6}
    counts = ds.fields["counts"]
    assert counts["left_out"] == {"rated_low": 2, "tool_calls": 1}
    assert counts["corrected"] == 1
    assert counts["by_target"] == {"other-target": 1, "smollm2-135m-cpu": 3}
    assert counts["by_prompt"] == {"keel-rag@1": 2, "none": 2}
    assert counts["by_data_class"] == {"internal": 1, "pii": 1, "public": 2}


def test_versions_are_content_hashes_published_once_kept_as_configured(zone, engine):
    store, storage = zone
    _fill(store, ["r-up", "r-corrected"])
    ds = dataset.build(store, engine, NOW)
    first = dataset.publish(storage, ds, NOW, keep=2)
    assert first.status == "published"
    manifest = first.manifest
    body = storage.read_bytes(dataset.STORE, "snapshots", ds.version, dataset.TRAIN)
    assert manifest["key"] == manifest["version"] == ds.version == hashlib.sha256(body).hexdigest()[:32]
    assert manifest["files"][dataset.TRAIN]["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["rows"] == 2 and manifest["zone"] == "us" and manifest["created_at"].startswith("20")
    assert manifest["requests"] == [["demo", "r-up"], ["demo", "r-corrected"]]
    assert manifest["expires_at"] == pytest.approx(NOW - 3600 + 30 * DAY)
    assert dataset.read(storage) == (manifest, [json.loads(line) for line in body.decode().splitlines()])

    # Unchanged: not published again. A low rating that leaves r-up's mean at 0.5 changes nothing in it either.
    store.put(Feedback("r-up", "demo", "k9", 0.0, "down", updated_at=NOW), store.link("r-up", "demo"))
    again = dataset.build(store, engine, NOW + 60)
    assert again.version == ds.version
    assert dataset.publish(storage, again, NOW + 60, keep=2).status == "unchanged"
    assert storage.listdir(dataset.STORE, "snapshots") == [ds.version]

    # New rated exchanges: new versions; the oldest beyond `keep` goes.
    versions = [ds.version]
    for name in ("r-split", "r-expiring"):
        _fill(store, [name], now=NOW + len(versions))
        nxt = dataset.build(store, engine, NOW + 60)
        assert dataset.publish(storage, nxt, NOW + 60, keep=2).status == "published"
        versions.append(nxt.version)
        time.sleep(0.01)  # snapshots are pruned by their folders' times
    assert len(set(versions)) == 3
    assert storage.listdir(dataset.STORE, "snapshots") == sorted(versions[1:])
    assert dataset.read(storage)[0]["key"] == versions[-1]


def test_an_empty_store_publishes_nothing(zone, engine):
    store, storage = zone
    _fill(store, ["r-down", "r-tool"])
    ds = dataset.build(store, engine, NOW)
    assert ds.rows == 0 and ds.lines == b""
    assert dataset.publish(storage, ds, NOW) == dataset.Published("empty", None)
    assert storage.listdir(dataset.STORE, "snapshots") == []


def test_retention_deletes_expired_exchanges_and_the_versions_holding_them(zone, engine, settings):
    from keel.orchestration.feedback import expire_zone

    store, storage = zone
    _fill(store, ["r-up", "r-expiring"])
    published = dataset.publish(storage, dataset.build(store, engine, NOW), NOW).manifest
    assert published is not None and published["rows"] == 2
    assert published["expires_at"] == pytest.approx(NOW - 3600 + 1 + 2 * DAY)

    later = NOW + 3 * DAY  # r-expiring's retention has run out, r-up's has not
    ds = dataset.build(store, engine, later)
    assert [r for _, r in ds.fields["requests"]] == ["r-up"]  # never read once expired, deleted or not
    counts = expire_zone(settings, "us", later)
    assert counts == {"exchanges": 1, "requests": 0, "words": 0, "dataset_versions": 1}
    assert store.count("exchanges") == 1 and store.count("feedback") == 2  # ratings outlive exchanges
    assert storage.listdir(dataset.STORE, "snapshots") == [] and not storage.exists(dataset.STORE, "CURRENT")
    assert dataset.publish(storage, ds, later).status == "published"
    # Past the window, the request links go too; past every retention, every exchange.
    counts = expire_zone(settings, "us", NOW + 31 * DAY)
    assert counts == {"exchanges": 1, "requests": 2, "words": 2, "dataset_versions": 1}
    assert store.count("exchanges") == 0 and store.count("requests") == 0
    assert [(r["comment"], r["correction"]) for r in store.feedback()] == [(None, None)] * 2  # scores stay


def test_the_job_publishes_once_and_records_what_it_read_in_the_audit_trail(settings):
    from ray_jobs import feedback_dataset

    store = open_zone(settings, "eu")
    try:
        _fill(store, ["r-up", "r-corrected", "r-down"], tenant="eu-tenant")
    finally:
        store.close()
    first = feedback_dataset.run(settings, "eu")
    assert first["status"] == "published" and first["rows"] == 2 and first["current"] == first["version"]
    assert {"PERSON", "EMAIL_ADDRESS"} <= set(first["findings"])
    second = feedback_dataset.run(settings, "eu")
    assert second["status"] == "unchanged" and second["version"] == first["version"]
    records = sorted((r for r in audit.records(ZoneStorage.for_zone(settings, "eu").audit_root())
                      if r["kind"] == "transformation" and r["job"] == dataset.STORE), key=lambda r: r["ts"])
    assert [r["status"] for r in records] == ["committed", "skipped"]
    assert records[0]["output"]["key"] == first["version"] and records[0]["input"]["stage"] == "feedback"
    assert records[0]["counts"] == {"rows": 2, "rated_low": 1}
    assert "John" not in json.dumps(records)


# -- the report ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    svc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield uri
    svc.stop()


def _rows(store, zone: str) -> list[dict]:
    return [report.without_text(r, zone) for r in store.feedback()]


def test_feedback_is_aggregated_by_target_variant_route_and_class_without_text(zone):
    store, _ = zone
    _fill(store)
    rows = _rows(store, "us")
    assert not {"comment", "correction"} & {k for r in rows for k, v in r.items() if isinstance(v, str)}
    groups = {(g.dimension, g.value): g for g in report.aggregate(rows)}
    total = groups[("all", "all")]
    assert (total.n, total.up, total.down, total.comments, total.corrections) == (10, 5, 5, 9, 1)
    assert total.mean_score == pytest.approx(0.5)
    assert groups[("target", "other-target")].n == 5
    assert groups[("target", "other-target")].mean_score == pytest.approx(2 / 5)
    assert groups[("prompt", "keel-rag@2")].mean_score == pytest.approx(1 / 4)
    assert groups[("prompt", "none")].n == 4
    assert groups[("strategy", "blend")].n == 10
    assert groups[("data_class", "pii")].mean_score == 1.0
    assert groups[("zone", "us")].n == 10


def test_the_report_logs_one_run_per_dag_run_with_table_and_plot(zone, mlflow_uri):
    from mlflow.tracking import MlflowClient

    store, _ = zone
    _fill(store)
    groups = report.aggregate(_rows(store, "us"))
    expired = {"us": {"exchanges": 2, "requests": 0, "dataset_versions": 1}}
    run = report.log(mlflow_uri, "keel_feedback", "manual__1", groups, expired, {"report_days": "30"})
    retried = report.log(mlflow_uri, "keel_feedback", "manual__1", groups, expired)
    assert retried == run  # a retried task logs into its first try's run
    other = report.log(mlflow_uri, "keel_feedback", "manual__2", groups[:1])
    assert other != run

    c = MlflowClient(mlflow_uri)
    logged = c.get_run(run)
    assert c.get_experiment(logged.info.experiment_id).name == report.EXPERIMENT
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["airflow_dag_id"] == "keel_feedback" and logged.data.tags["report_days"] == "30"
    m = logged.data.metrics
    assert m["n"] == 10 and m["mean_score"] == pytest.approx(0.5) and m["corrections"] == 1
    assert m["target.smollm2-135m-cpu.n"] == 5 and m["prompt.keel-rag_1.mean_score"] == pytest.approx(0.5)
    assert m["data_class.public.n"] == 7 and m["expired.us.exchanges"] == 2
    assert {a.path for a in c.list_artifacts(run, "feedback")} == {"feedback/groups.json", "feedback/scores.png"}
    table = json.loads(Path(c.download_artifacts(run, "feedback/groups.json")).read_text())
    assert table["columns"][:3] == ["dimension", "value", "n"] and len(table["data"]) == len(groups)
    assert "thanks" not in json.dumps(table)
