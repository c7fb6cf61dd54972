"""The `keel` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import typer

import keel
from keel.records import Record, output_line, read_records

if TYPE_CHECKING:
    from keel.privacy.engine import PrivacyEngine
    from keel.privacy.redact import RedactionMode
    from keel.settings import KeelSettings

T = TypeVar("T")

app = typer.Typer(help="Keel: production anatomy for AI systems.", no_args_is_help=True, add_completion=False)
pii_app = typer.Typer(help="Detect and redact PII in JSONL {\"id\", \"text\"} records.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail in each zone's storage.", no_args_is_help=True)
eval_app = typer.Typer(help="Continuous evaluation: golden sets through the gateway, scored in MLflow.",
                        no_args_is_help=True)
keys_app = typer.Typer(help="Gateway API keys (stored hashed; a key is shown once, at creation).", no_args_is_help=True)
secrets_app = typer.Typer(help="Keel's own secret keys: the audit trail's signing key and the privacy hash key.",
                          no_args_is_help=True)
app.add_typer(pii_app, name="pii")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(audit_app, name="audit")
app.add_typer(eval_app, name="eval")
prompts_app = typer.Typer(help="The gateway's system prompts and their variants, in the MLflow Prompt Registry.",
                          no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")

InputOpt = typer.Argument(None, help="JSONL file; standard input when omitted or '-'", show_default=False)
ConfigOpt = typer.Option(None, "--config", "-c",
                         help="keel.yaml to use (default: $KEEL_CONFIG, keel.yaml in Keel's home, the example)")
ZoneOpt = typer.Option(None, "--zone", "-z", help="zone(s) to search (default: every zone)")
TargetsOpt = typer.Option(None, "--target", "-t", help="target or alias; repeat (default: evaluation.targets)")
SetsOpt = typer.Option(None, "--set", "-s", help="golden set: rag, safety, privacy; repeat (default: all)")


@app.command()
def version() -> None:
    """Print Keel's version."""
    typer.echo(f"keel {keel.__version__}")


@config_app.command("check")
def config_check(config: Path | None = ConfigOpt) -> None:
    """Validate keel.yaml, its targets and the environment; print a summary, or where and why each error is."""
    from keel.keys import KeyStore
    from keel.settings import config_path
    from keel.target_kinds import validate_targets

    s = _settings(config)
    p = s.policy
    if problems := validate_targets(p):
        typer.echo("\n".join(problems), err=True)
        raise typer.Exit(2)
    keys = list(KeyStore(s).active().values())  # what the gateway accepts: keel.yaml's and `keel keys`' keys
    typer.echo(f"{config_path(config)}: ok (home {s.home})")
    typer.echo(f"  host {s.host}; ports " + ", ".join(f"{k} {v}" for k, v in s.ports.model_dump().items()))
    typer.echo("  zones: " + ", ".join(f"{n} ({z.region}, {z.storage})" for n, z in p.zones.items()))
    typer.echo("  data classes: "
               + "; ".join(f"{dc.value} -> {', '.join(r.allowed_zones)}" for dc, r in p.data_classes.items()))
    typer.echo(f"  targets: {', '.join(t.name for t in p.targets) or '(none)'}")
    typer.echo(f"  tenants: {', '.join(f'{t.name} ({keys.count(t.name)} keys)' for t in p.tenants) or '(none)'}")
    for line, missing in _secret_lines(s):
        typer.echo(f"  {'warning: ' if missing else ''}{line}", err=missing)
    if not s.guard.enabled:
        typer.echo("  warning: guard.enabled is false: prompts reach model targets with their PII", err=True)


@pii_app.command("detect")
def pii_detect(input: str | None = InputOpt, config: Path | None = ConfigOpt) -> None:
    """Write {"id", "entities": [{"type", "start", "end", "score"}]} per input line (character offsets)."""
    engine = _engine(config)
    stream = _open(input)
    progress = _Progress(stream)
    for record, spans in _process(stream, engine, lambda texts: engine.detect_batch(texts, progress=progress)):
        _write(output_line(record, entities=[s.to_dict() for s in spans] if spans is not None else None))
    progress.done()


@pii_app.command("redact")
def pii_redact(
    input: str | None = InputOpt,
    mode: str = typer.Option("typed", help="typed: [PERSON]; hashed: [PERSON:1a2b3c4d] (keyed, links equal values)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Write {"id", "text"} per input line with every detected value replaced by a token."""
    if mode not in ("typed", "hashed"):
        raise typer.BadParameter("use 'typed' or 'hashed'", param_hint="--mode")
    redaction: RedactionMode = "typed" if mode == "typed" else "hashed"
    engine = _engine(config)
    stream = _open(input)
    progress = _Progress(stream)
    for record, text in _process(stream, engine, lambda texts: engine.redact_batch(texts, redaction, progress)):
        _write(output_line(record, text=text))
    progress.done()


@app.command()
def search(
    query: str = typer.Argument(..., help="what to look for"),
    k: int = typer.Option(5, "-k", min=1, max=100, help="how many chunks"),
    zone: list[str] = ZoneOpt,
    tenant: str | None = typer.Option(None, "--tenant", "-t",
                                      help="only the sources this tenant may read, as its RAG does (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per hit"),
    config: Path | None = ConfigOpt,
) -> None:
    """Top chunks of the scrubbed documents' vector index (the one the gateway uses for retrieval)."""
    from keel.retrieval import Retriever

    settings = _settings(config)
    zones = zone or sorted(settings.policy.zones)
    unknown = [z for z in zones if z not in settings.policy.zones]
    if unknown:
        typer.echo(f"unknown zone(s): {', '.join(unknown)}; configured: {', '.join(settings.policy.zones)}", err=True)
        raise typer.Exit(2)
    if tenant is not None and tenant not in {t.name for t in settings.policy.tenants}:
        typer.echo(f"unknown tenant {tenant!r}; configured: {', '.join(t.name for t in settings.policy.tenants)}",
                   err=True)
        raise typer.Exit(2)
    hits = Retriever(settings).search(query, zones, k, tenant=tenant)
    if not hits:
        readable = f"no chunk tenant {tenant!r} may read, or " if tenant is not None else ""
        typer.echo(readable + "no index yet: run the keel_ingest DAG (or `make up`) first", err=True)
        raise typer.Exit(1)
    for rank, h in enumerate(hits, 1):
        if as_json:
            typer.echo(json.dumps({"rank": rank, **h.to_dict()}, ensure_ascii=False))
        else:
            snippet = " ".join(h.text.split())[:200]
            typer.echo(f"{rank}. [{h.zone}] {h.title or h.source}  (distance {h.distance:.3f})\n"
                       f"   {h.source}\n   {snippet}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", "-t", help="a tenant of policy.tenants"),
    name: str = typer.Option("", "--name", "-n", help="a label to recognise the key by"),
    config: Path | None = ConfigOpt,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    from keel.errors import NotFoundError
    from keel.keys import KeyStore

    key, rec = _or_exit(lambda: KeyStore(_settings(config)).create(tenant, name), NotFoundError, 2)
    typer.echo(key)
    typer.echo(f"id {rec.id}, tenant {rec.tenant}: store it now, it cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(config: Path | None = ConfigOpt) -> None:
    """Keys by id, tenant, name, creation and revocation time (never the keys themselves)."""
    from keel.keys import KeyStore

    settings = _settings(config)
    for t in settings.policy.tenants:
        for h in t.api_key_hashes:
            typer.echo(f"{h.removeprefix('sha256:')[:12]}  {t.name:<12} (keel.yaml)")
    for r in KeyStore(settings).records():
        state = f"revoked {r.revoked}" if r.revoked else "active"
        typer.echo(f"{r.id}  {r.tenant:<12} {r.name or '-':<16} created {r.created}  {state}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key's id from `keel keys list`"),
                config: Path | None = ConfigOpt) -> None:
    """Revoke a key; running gateways refuse it within a second."""
    from keel.errors import NotFoundError
    from keel.keys import KeyStore

    rec = _or_exit(lambda: KeyStore(_settings(config)).revoke(key_id), NotFoundError, 1)
    typer.echo(f"revoked {rec.id} ({rec.tenant})")


@secrets_app.command("list")
def secrets_list(config: Path | None = ConfigOpt) -> None:
    """Each key's id and where it comes from (never the key): the active one and the retired ones."""
    for line, missing in _secret_lines(_settings(config), retired=True):
        typer.echo(line, err=missing)


@secrets_app.command("rotate")
def secrets_rotate(purpose: str = typer.Argument(..., help="audit or hash"),
                   yes: bool = typer.Option(False, "--yes", help="rotate the hash key (re-runs the pipeline)"),
                   config: Path | None = ConfigOpt) -> None:
    """Make a new active key; the old one is kept, retired (the audit key's still verifies what it signed).
    Restart the stack (`keel down && keel up`) so every process signs with the new key."""
    from keel import secret_keys

    s = _settings(config)
    if purpose not in secret_keys.PURPOSES:
        typer.echo(f"unknown key {purpose!r}: audit or hash", err=True)
        raise typer.Exit(2)
    if (where := s.key_source(purpose)) and where.startswith("KEEL_"):
        typer.echo(f"the {purpose} key comes from {where} here: rotate it in your secret store (and list the old one "
                   f"in KEEL_AUDIT__RETIRED_HMAC_KEYS for the audit key)", err=True)
        raise typer.Exit(2)
    if purpose == "hash" and not yes:
        typer.echo("a new hash key changes every [TYPE:xxxxxxxx] token and the pipeline's config version, so the next "
                   "run re-processes every document: pass --yes to go on", err=True)
        raise typer.Exit(2)
    keys, retired = secret_keys.rotate(s.state, purpose)
    typer.echo(f"{purpose} key {keys.active_id} is active" + (f"; {retired} retired" if retired else "")
               + ". Restart the stack (keel down && keel up) so every process uses it.")


def _secret_lines(s: KeelSettings, retired: bool = False) -> list[tuple[str, bool]]:
    """(line, whether it warns) for each secret key: its id and where it comes from, never the key."""
    from keel import secret_keys

    lines = []
    for purpose in secret_keys.PURPOSES:
        if (where := s.key_source(purpose)) is None:
            lines.append((f"{purpose} key: none yet (`keel up` generates one, or set "
                          f"{'KEEL_AUDIT__HMAC_KEY' if purpose == 'audit' else 'KEEL_PRIVACY__HASH_KEY'})", True))
            continue
        installed = secret_keys.load(s.state, purpose)
        keys = (s.audit_keys() if purpose == "audit"
                else secret_keys.KeySet.of(s.hash_key(), installed.keys.values() if installed else []))
        lines.append((f"{purpose} key {keys.active_id} (active, from {where})", False))
        if retired:
            lines += [(f"{purpose} key {k} (retired{': verifies what it signed' if purpose == 'audit' else ''})",
                       False) for k in keys.keys if k != keys.active_id]
    return lines


@audit_app.command("verify")
def audit_verify(config: Path | None = ConfigOpt) -> None:
    """Check every writer's hash chain and signed digests in every zone; name the first broken record."""
    from keel import audit
    from keel.errors import ConfigError

    s = _settings(config)
    keys = _or_exit(s.audit_keys, ConfigError, 2)
    bad, checked, sealed = False, 0, 0
    live: dict[str, int] = {}
    dead: dict[str, int] = {}
    roots = audit.roots(s)
    for zone, root in roots.items():
        report = audit.verify(root, keys)
        for w, n in report.records.items():
            state = "open" if w in report.live else "closed"
            typer.echo(f"{zone}/{w}: {n} records, {report.sealed[w]} sealed by a valid digest ({state})")
        for w, n in report.dev_signed.items():
            typer.echo(f"{zone}/{w}: warning: {n} digest(s) signed with the development key (the constant Keel "
                       f"signed with before per-install keys): they verify, but anyone who read Keel's source could "
                       f"have signed them", err=True)
        for p in report.problems:
            typer.echo(f"{zone}/{p}", err=True)
        bad, checked = bad or not report.ok, checked + sum(report.records.values())
        sealed += sum(report.sealed.values())
        live = {**live, **{f"{zone}/{w}": n for w, n in report.unsigned(live=True).items()}}
        dead = {**dead, **{f"{zone}/{w}": n for w, n in report.unsigned(live=False).items()}}
    if bad:
        raise typer.Exit(1)
    if not checked:  # "intact" after checking nothing would vouch for a trail that is not there
        typer.echo(f"no audit trail to verify in {', '.join(str(r) for r in roots.values())} (home {s.home})", err=True)
        raise typer.Exit(1)
    # Unsigned records are chained but not signed: a deletion at their tail cannot be told from records
    # never written, so they are counted apart from the sealed ones, never called intact.
    typer.echo(f"audit trail intact: {sealed} sealed records")
    if live:
        typer.echo(f"  {sum(live.values())} records of open writers not sealed yet (sealed within "
                   f"{s.audit.seal_after_s:g} s): {', '.join(f'{w} {n}' for w, n in live.items())}")
    if dead:
        typer.echo(f"  {sum(dead.values())} records of closed writers never sealed (a writer that died; the next "
                   f"writer to open the zone seals them): {', '.join(f'{w} {n}' for w, n in dead.items())}")


@audit_app.command("show")
def audit_show(request_id: str = typer.Argument(..., help="a request id (x-request-id)"),
               as_json: bool = typer.Option(False, "--json", help="the records themselves, one JSON object a line"),
               config: Path | None = ConfigOpt) -> None:
    """Explain one request's decision: route and reasons, failovers, answer, guard actions (--json: the records)."""
    from keel import audit

    found = sorted((r for root in audit.roots(_settings(config)).values() for r in audit.find(root, request_id)),
                   key=lambda r: str(r["ts"]))
    if not found:
        typer.echo(f"no audit record for request {request_id!r}", err=True)
        raise typer.Exit(1)
    for r in found:
        typer.echo(json.dumps(r, ensure_ascii=False) if as_json else audit.explain(r))


@eval_app.command("run")
def eval_run(
    target: list[str] = TargetsOpt,
    golden: list[str] = SetsOpt,
    sample_size: int | None = typer.Option(None, help="items per set; 0: the whole sets"),
    wait: bool = typer.Option(False, "--wait", help="wait for the run and print each target against its baseline"),
    timeout: float = typer.Option(3600, help="seconds to wait with --wait"),
    config: Path | None = ConfigOpt,
) -> None:
    """Trigger the keel_evaluate DAG in this stack's Airflow (what the UI's "Trigger DAG" does)."""
    from keel.orchestration.evaluate import DAG_ID
    from keel.stack import LocalStack

    stack = LocalStack(_settings(config), config)
    ev = stack.s.evaluation
    conf = {"targets": target or ev.targets, "sets": golden or ev.sets,
            "sample_size": ev.sample_size if sample_size is None else sample_size}
    api = _or_exit(stack.airflow, OSError, 1, "keel eval run: Airflow does not answer (is `keel up` running?): ")
    run = api.trigger(DAG_ID, conf)
    typer.echo(f"triggered {DAG_ID} run {run['dag_run_id']}: {json.dumps(conf)}")
    typer.echo(f"  {stack.urls['airflow']}/dags/{DAG_ID}/runs/{run['dag_run_id']}")
    if not wait:
        return
    done = api.wait_done(DAG_ID, run["dag_run_id"], time.monotonic() + timeout)
    typer.echo(f"{DAG_ID} run {run['dag_run_id']}: {done['state']}")
    _show(stack.mlflow_uri(), None, stack.s)
    raise typer.Exit(0 if done["state"] == "success" else 1)


@eval_app.command("show")
def eval_show(
    target: str | None = typer.Option(None, "--target", "-t", help="one target or alias (default: every one)"),
    config: Path | None = ConfigOpt,
) -> None:
    """The latest evaluation of each target against its baseline: every metric, and what regressed."""
    from keel.stack import LocalStack

    settings = _settings(config)
    _show(LocalStack(settings, config).mlflow_uri(), target, settings)


@eval_app.command("promote")
def eval_promote(run_id: str = typer.Argument(..., help="an evaluation run's id (MLflow UI, `keel eval show`)"),
                 config: Path | None = ConfigOpt) -> None:
    """Make a completed evaluation run the baseline of its target (the run tag `baseline`)."""
    from keel.errors import NotFoundError
    from keel.evaluation import runs
    from keel.stack import LocalStack

    settings = _settings(config)
    run, before = _or_exit(lambda: runs.promote(LocalStack(settings, config).mlflow_uri(), run_id), NotFoundError,
                           1, "keel eval promote: ")
    replaced = f" (replacing {before.info.run_id})" if before is not None and before.info.run_id != run_id else ""
    typer.echo(f"run {run_id} is now the baseline of {run.data.tags['target']}{replaced}")


@eval_app.command("clear")
def eval_clear(target: str = typer.Argument(..., help="a target whose latest evaluation regressed"),
               config: Path | None = ConfigOpt) -> None:
    """Let a regressed target back into automatic routing before an evaluation passes (tags the failed run)."""
    from keel.errors import NotFoundError
    from keel.evaluation import standing
    from keel.stack import LocalStack

    settings = _settings(config)
    run_id = _or_exit(lambda: standing.clear(LocalStack(settings, config).mlflow_uri(), target), NotFoundError, 1,
                      "keel eval clear: ")
    if run_id is None:
        typer.echo(f"{target}: its latest evaluation did not regress; nothing to clear")
        return
    typer.echo(f"{target}: regression of run {run_id} cleared; every gateway replica lets it back into automatic "
               f"routing within {settings.evaluation.standing_refresh_s:g} s")


PromptArg = typer.Argument(..., help="keel-rag, keel-auto, keel-fast, keel-cheap, keel-smart (or keel/rag...)")
VersionArg = typer.Argument(..., help="a version number from `keel prompts list`")


@prompts_app.command("list")
def prompts_list(config: Path | None = ConfigOpt) -> None:
    """Every version of each prompt, in the pool or out of it (and why), as the gateways read them."""
    import httpx

    from keel.feedback import prompts
    from keel.stack import LocalStack

    source = prompts.PromptSource(LocalStack(_settings(config), config).mlflow_uri())
    try:
        found = _or_exit(source.versions, httpx.HTTPError, 1, "keel prompts list: MLflow does not answer: ")
    finally:
        source.close()
    for name, versions in found.items():
        typer.echo(f"{name}:")
        for v, out in versions:
            state = "in the pool" if out is None else f"out: {out}"
            first = (v.text.strip().splitlines() or [""])[0][:60]
            typer.echo(f"  {v.id:<16} {state:<40} {first}")
        if all(out is not None for _, out in versions):
            typer.echo("  no version in the pool: " + ("the built-in text answers" if name == prompts.RAG else
                                                        "nothing is added to its requests"))


@prompts_app.command("add")
def prompts_add(prompt: str = PromptArg,
                text: str = typer.Argument(..., help="a file holding the new text; '-' for standard input"),
                message: str = typer.Option(..., "--message", "-m", help="what changed, and why"),
                config: Path | None = ConfigOpt) -> None:
    """Register a new version of a prompt: a variant the gateways start sampling at their next refresh."""
    from keel.errors import KeelError
    from keel.feedback import prompts
    from keel.stack import LocalStack

    settings = _settings(config)
    name = prompts.prompt_name(prompt) or prompt
    body = sys.stdin.read() if text == "-" else _or_exit(Path(text).read_text, OSError, 1, "keel prompts add: ")
    version = _or_exit(lambda: prompts.register(LocalStack(settings, config).mlflow_uri(), name, body, message),
                       KeelError, 1, "keel prompts add: ")
    typer.echo(f"{name}@{version} registered; every gateway replica samples it within "
               f"{settings.feedback.refresh_s:g} s")


@prompts_app.command("retire")
def prompts_retire(prompt: str = PromptArg, version: int = VersionArg,
                   reason: str = typer.Option(..., "--reason", "-r", help="why it leaves the pool"),
                   config: Path | None = ConfigOpt) -> None:
    """Take a version out of the pool: the gateways stop choosing it (`keel prompts restore` undoes it)."""
    from keel.errors import KeelError
    from keel.feedback import prompts
    from keel.stack import LocalStack

    settings = _settings(config)
    name = prompts.prompt_name(prompt) or prompt
    _or_exit(lambda: prompts.retire(LocalStack(settings, config).mlflow_uri(), name, version, reason), KeelError, 1,
             "keel prompts retire: ")
    typer.echo(f"{name}@{version} is out of the pool; every gateway replica stops choosing it within "
               f"{settings.feedback.refresh_s:g} s")


@prompts_app.command("restore")
def prompts_restore(prompt: str = PromptArg, version: int = VersionArg, config: Path | None = ConfigOpt) -> None:
    """Put a retired version back in the pool."""
    from keel.errors import KeelError
    from keel.feedback import prompts
    from keel.stack import LocalStack

    settings = _settings(config)
    name = prompts.prompt_name(prompt) or prompt
    _or_exit(lambda: prompts.restore(LocalStack(settings, config).mlflow_uri(), name, version), KeelError, 1,
             "keel prompts restore: ")
    typer.echo(f"{name}@{version} is in the pool again")


def _show(tracking_uri: str, target: str | None, settings: KeelSettings) -> None:
    from keel.evaluation import runs, standing

    c = runs.client(tracking_uri)
    exp = runs.experiment_id(c)
    found = c.search_runs([exp], f"tags.`{runs.COMPLETE_TAG}` = 'true'", order_by=["attributes.start_time DESC"])
    names = [target] if target else sorted({r.data.tags["target"] for r in found})
    if not names:
        typer.echo("no evaluation run yet: `keel eval run` starts one")
        raise typer.Exit(1)
    ev = settings.evaluation
    now = standing.read_once(tracking_uri, settings.policy.targets, ev.canary_share, ev.canary_step)
    for name in names:
        latest = runs.latest(c, exp, name)
        if latest is None:
            typer.echo(f"{name}: no completed evaluation run")
            continue
        base = runs.baseline(c, exp, name, runs.scope_of(latest))
        gate = latest.data.tags.get("gate", "?")
        base_id = base.info.run_id if base is not None else "none (`keel eval promote <run id>`)"
        typer.echo(f"\n{name}: run {latest.info.run_id} ({gate}), baseline {base_id}")
        if name in now:
            typer.echo(f"  routing: {now[name].state} ({now[name].reason})")
        typer.echo(f"  {'metric':<20} {'baseline':>12} {'latest':>12}  verdict")
        for metric, b, new, verdict in runs.comparison(latest, base, settings.evaluation.thresholds):
            typer.echo(f"  {metric:<20} {b:>12} {new:>12}  {verdict}")


@app.command()
def serve(
    address: str | None = typer.Option(None, "--address",
                                       help="Ray cluster host:port (default: the head `keel up` started)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Deploy (or redeploy) the gateway and its model targets to the running stack's Ray head."""
    from keel.errors import StackError
    from keel.stack import LocalStack

    stack = LocalStack(_settings(config), config)
    status = _or_exit(lambda: stack.deploy(address), StackError, 1, prefix="keel serve: ")
    if status:
        raise typer.Exit(status)


@app.command()
def up(
    load: bool = typer.Option(True, "--load/--no-load", help="run the sample corpus through the DAG chain"),
    timeout: float = typer.Option(900, help="seconds to wait for the stack (and the corpus load)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Start the local stack (Ray head + gateway, MLflow, Airflow), load the sample corpus, print how to use it."""
    from keel.errors import StackError
    from keel.stack import LocalStack

    os.umask(0o077)  # what `keel up` and its services write is the owner's only (keel.processes.spawn)
    stack = LocalStack(_settings(config), config)
    typer.echo(f"keel up: state in {stack.state}")
    t0 = time.monotonic()
    try:
        r = stack.up(lambda line: typer.echo(line), load=load, timeout_s=timeout)
    except StackError as e:
        typer.echo(f"keel up failed: {e}", err=True)
        raise typer.Exit(1) from None
    if r.loaded:
        typer.echo(f"  corpus   {r.loaded}")
    u = r.urls
    typer.echo(f"""
ready in {time.monotonic() - t0:.0f} s
  gateway    {u['gateway']}   (OpenAI API; key below)
  Airflow    {u['airflow']}   (user {r.airflow_user}, password {r.airflow_password})
  Ray        {u['ray']}   (dashboard; token in {stack.token})
  MLflow     {u['mlflow']}

Try it:
  curl -s {u['gateway']}/chat/completions -H "Authorization: Bearer {r.api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "keel/auto", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{u['gateway']}", api_key="{r.api_key}")
  answer = client.chat.completions.create(
      model="keel/rag", messages=[{{"role": "user", "content": "What is the refund policy?"}}])
  print(answer.choices[0].message.content)

Evaluation: the new index starts the keel_evaluate DAG (nine golden items per target, three per set, through the
gateway, a few minutes of the CPU model, in the background); its first run becomes the baseline.
  keel eval show         each target's latest evaluation against its baseline (MLflow: keel-evaluation)

keel status shows each service; keel down (make down) stops them all.""")


@app.command()
def status(config: Path | None = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Health, PID, memory (PSS) and URL of each local service; exits 3 when one is not healthy."""
    from dataclasses import asdict

    from keel.stack import LocalStack

    rows = LocalStack(_settings(config), config).status()
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows]))
    else:
        for r in rows:
            mem = f"{r.pss_bytes / 2**20:7.0f} MB" if r.pid else " " * 10
            typer.echo(f"{r.name:<8} {r.state:<9} {str(r.pid or ''):>7} {mem}  {r.url}  {r.detail if r.pid else ''}")
        typer.echo(f"{'total':<8} {'':<9} {'':>7} {sum(r.pss_bytes for r in rows) / 2**20:7.0f} MB  (PSS)")
    if any(r.state != "healthy" for r in rows):
        raise typer.Exit(3)


@app.command()
def down(config: Path | None = ConfigOpt) -> None:
    """Stop everything `keel up` started, by PID; the state folder stays."""
    from keel.stack import LocalStack

    left = LocalStack(_settings(config), config).down(lambda line: typer.echo(line))
    if left:
        typer.echo(f"processes still alive after SIGKILL: {left}", err=True)
        raise typer.Exit(1)
    typer.echo("no keel process left")


def _settings(config: Path | None) -> KeelSettings:
    """The settings, or exit 2 naming each error; a note on stderr when no home was found here or above
    and the project's folder is used from elsewhere."""
    from keel.errors import ConfigError
    from keel.settings import find_home, load_settings

    s = _or_exit(lambda: load_settings(config), ConfigError, 2)
    home, here = find_home(), Path.cwd().resolve()
    if not home.found and s.home == home.path and not here.is_relative_to(home.path):
        typer.echo(f"keel: no keel.yaml or .keel/ in {here} or above; home is {home.path} "
                   f"(set KEEL_HOME to choose another)", err=True)
    return s


def _or_exit(action: Callable[[], T], error: type[Exception], status: int, prefix: str = "") -> T:
    """action(), or its error's message on stderr and exit with status."""
    try:
        return action()
    except error as e:
        typer.echo(f"{prefix}{e}", err=True)
        raise typer.Exit(status) from None


def _engine(config: Path | None) -> PrivacyEngine:
    from keel.privacy.engine import PrivacyEngine

    logging.disable(logging.WARNING)  # spaCy/Presidio chatter must not mix with JSONL on stdout
    return PrivacyEngine(_settings(config).privacy)


def _process(stream: BinaryIO, engine: PrivacyEngine,
             fn: Callable[[list[str]], Sequence[T]]) -> Iterator[tuple[Record, T | None]]:
    """Run fn over batches of good records; yield (record, result) for every input line, in order.

    A batch that raises is retried one record at a time, so one bad record costs only itself.
    """
    batch: list[Record] = []
    size = engine.settings.batch_size
    for record in read_records(stream, engine.settings.max_text_bytes):
        batch.append(record)
        if len(batch) >= size:
            yield from _run_batch(batch, fn)
            batch = []
    yield from _run_batch(batch, fn)


def _run_batch(batch: list[Record], fn: Callable[[list[str]], Sequence[T]]) -> Iterator[tuple[Record, T | None]]:
    good = [r for r in batch if r.error is None]
    results: dict[int, T]
    try:
        results = dict(zip(map(id, good), fn([r.text or "" for r in good]), strict=True)) if good else {}
    except Exception:  # noqa: BLE001 - isolate the failing record below
        results = {}
        for r in good:
            try:
                results[id(r)] = fn([r.text or ""])[0]
            except Exception as e:  # noqa: BLE001 - one output line per input, whatever happens
                r.error = f"processing failed: {type(e).__name__}"
    for r in batch:
        yield r, results.get(id(r))


def _open(input: str | None) -> BinaryIO:
    if input in (None, "-"):
        return sys.stdin.buffer
    try:
        return open(input, "rb")  # read until the process ends
    except OSError as e:
        typer.echo(f"cannot read {input}: {e.strerror}", err=True)
        raise typer.Exit(2) from None


class _Progress:
    """`keel pii` on a long input: on stderr (stdout is the JSONL), from 2 s on and every 5 s, how much
    text has been analysed, and of how much when the input is a file."""

    def __init__(self, stream: BinaryIO, first_s: float = 2.0, every_s: float = 5.0) -> None:
        self.start = time.monotonic()
        self.next, self.every_s = self.start + first_s, every_s
        try:  # a file has a size; a pipe does not
            self.total = os.fstat(stream.fileno()).st_size if stream.seekable() else 0
        except OSError:
            self.total = 0
        self.chars, self.shown = 0, False

    def __call__(self, chars: int) -> None:
        self.chars += chars
        if (now := time.monotonic()) >= self.next:
            self.next = now + self.every_s
            self._show(now)

    def done(self) -> None:
        if self.shown:  # a short input says nothing, a long one says when it is over
            typer.echo(f"keel pii: done, {self.chars / 1e6:.1f} MB of text in {self._elapsed()}", err=True)

    def _show(self, now: float) -> None:
        self.shown = True
        # Characters of text against the file's bytes (JSON around them): an estimate, never past 99%.
        of = f" of a {self.total / 1e6:.1f} MB file (~{min(0.99, self.chars / self.total):.0%})" if self.total else ""
        typer.echo(f"keel pii: {self.chars / 1e6:.1f} MB of text analysed{of}, {self._elapsed()}", err=True)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.start:.0f} s"


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    app()
