"""Each stage of the gateway's request path alone, without Ray Serve: fake targets, a fake clock,
fake keys, trails and guard (pure Python, no network)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator

import pytest

from keel import errors
from keel.audit import canonical
from keel.breaker import CircuitBreaker
from keel.feedback.prompts import RAG_PROMPT
from keel.guard import Actions, Protected
from keel.pipeline.index import Hit
from keel.policy import DataClass, DataClassRule, ModelTarget, Policy, Tenant, Zone
from keel.privacy.pseudonymize import Vault
from keel.routing import DEFAULT_MAX_TOKENS, LatencyStats, Weights
from serving.failover import Limits, TargetState
from serving.metrics import Metrics
from serving.request import pipeline
from serving.request.admit import Admission, Admit
from serving.request.authenticate import Authenticate
from serving.request.check import Check
from serving.request.context import RequestContext
from serving.request.generate import Generate
from serving.request.ground import Ground
from serving.request.parse import Parse
from serving.request.protect import Protect
from serving.request.record import Record
from serving.request.reply import Reply
from serving.request.route import Router
from serving.request.scope import Scope
from serving.targets.base import Chunk, TargetError

# -- fakes --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class HTTP:
    """The request as the stages read it: headers (lowercase, as Starlette gives them) and a body."""

    def __init__(self, body: dict | bytes | None = None, key: str | None = "good-key", **headers: str) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            self.headers["authorization"] = f"Bearer {key}"
        self.raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()

    async def body(self) -> bytes:
        return self.raw


class Keys:
    def tenant(self, api_key: str) -> str | None:
        return {"good-key": "acme", "basic-key": "basic", "eval-key": "evals"}.get(api_key)


class FakeTarget:
    """A target that answers from a script: a list of texts then "stop", or an error before/after some chunks."""

    def __init__(self, name: str, zone: str = "us", *, words: tuple[str, ...] = ("Hello", " there."),
                 fail: TargetError | None = None, after: int = 0, ctx: int = 4096, pause_s: float = 0.0) -> None:
        self.config = ModelTarget(name=name, kind="openai", zone=zone, price_per_1k_input=0.1, price_per_1k_output=0.1,
                                  tier="small", max_context=ctx)
        self.words, self.fail, self.after, self.pause_s = words, fail, after, pause_s  # pause: before each word
        self.bodies: list[dict] = []

    async def stream(self, kind: str, body: dict) -> AsyncIterator[Chunk]:
        self.bodies.append(body)
        for i, w in enumerate(self.words):
            if self.fail is not None and i == self.after:
                raise self.fail
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            yield Chunk(w)
        yield Chunk("", finish_reason="stop", usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})

    def continuation(self, kind: str, body: dict, sent: str) -> dict:
        return {**body, "continue_from": sent}

    async def aclose(self) -> None:
        pass


class Trails:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def submit(self, zone: str, kind: str, /, **fields) -> None:
        self.records.append((zone, kind, fields))


class Limiter:
    def __init__(self) -> None:
        self.settled: list[tuple[str, int, int]] = []

    def settle(self, tenant: str, charged: int, used: int) -> None:
        self.settled.append((tenant, charged, used))


class FakeGuard:
    """Pseudonymizes every "Maria" as <PERSON_1>; blocks an answer that calls someone an idiot."""

    checks_output = True

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails

    def protect(self, body: dict, pieces: dict | None = None, keep: frozenset = frozenset()) -> Protected:
        if self.fails:
            raise RuntimeError("the PII engine fell over")
        vault = Vault({"<PERSON_1>": "Maria"})
        text = json.dumps(body).replace("Maria", "<PERSON_1>")
        return Protected(json.loads(text), vault, {"PERSON": 1}, json.dumps(body))

    def unprotected(self, body: dict) -> Protected:
        return Protected(body, Vault(), {}, json.dumps(body))

    def check(self, text: str, protected: Protected, actions: Actions) -> tuple[str, bool]:
        if "idiot" in text:
            actions.toxicity, actions.toxicity_action = 0.99, "blocked"
            return "", True
        return text, False


POLICY = Policy(
    zones={"us": Zone(region="us-east-1", storage="data/us"), "eu": Zone(region="eu-west-1", storage="data/eu")},
    data_classes={DataClass.public: DataClassRule(allowed_zones=["us", "eu"]),
                  DataClass.internal: DataClassRule(allowed_zones=["us", "eu"]),
                  DataClass.pii: DataClassRule(allowed_zones=["eu"]),
                  DataClass.phi: DataClassRule(allowed_zones=["us"])},
    tenants=[Tenant(name="acme", allowed_classes=list(DataClass), default_class=DataClass.internal),
             Tenant(name="basic", allowed_classes=[DataClass.public, DataClass.internal],
                    default_class=DataClass.internal, allowed_zones=["us"], requests_per_minute=1),
             Tenant(name="evals", allowed_classes=[DataClass.public, DataClass.internal],
                    default_class=DataClass.internal, requests_per_minute=1, purpose="evaluation")],
)
TENANTS = {t.name: t for t in POLICY.tenants}
KEY = b"the-trails-key"  # the audit trail's HMAC key
CHAT = {"model": "keel/auto", "messages": [{"role": "user", "content": "Hi, I am Maria."}]}


def states(*targets: FakeTarget, clock: Clock | None = None) -> dict[str, TargetState]:
    return {t.config.name: TargetState(t, CircuitBreaker(1, 10.0, clock=clock or Clock()), LatencyStats(), 4)
            for t in targets}


def run(coro):
    return asyncio.run(coro)


def context(body: dict | bytes | None = None, endpoint: str = "chat", **http) -> RequestContext:
    return RequestContext(HTTP(body if body is not None else CHAT, **http), endpoint, "req-1", 100.0)


async def through(stages, ctx: RequestContext) -> RequestContext:
    await pipeline.run(stages, ctx)
    return ctx


def parsed(body: dict | None = None, tenant: str = "acme", **http) -> RequestContext:
    """A context past authenticate, parse and scope."""
    ctx = context(body, key={"acme": "good-key", "basic": "basic-key", "evals": "eval-key"}[tenant], **http)
    return run(through([Authenticate(Keys(), TENANTS), Parse(), Scope(POLICY)], ctx))


def refused(stage, ctx: RequestContext) -> errors.KeelError:
    with pytest.raises(errors.KeelError) as e:
        run(stage(ctx))
    return e.value


def wire(e: errors.KeelError) -> tuple[int, str | None, str | None]:
    body = errors.error_body(e)["error"]
    return errors.http_status(e)[0], body["code"], body["param"]


# -- authenticate, parse, scope -----------------------------------------------------------------


def test_authenticate_finds_the_keys_tenant_and_refuses_a_missing_or_unknown_key():
    auth = Authenticate(Keys(), TENANTS)
    assert wire(refused(auth, context(key=None))) == (401, "missing_api_key", None)
    assert wire(refused(auth, context(key=""))) == (401, "missing_api_key", None)
    assert wire(refused(auth, context(key="keel-wrong"))) == (401, "invalid_api_key", None)
    ctx = context()
    run(auth(ctx))
    assert ctx.tenant is TENANTS["acme"]


@pytest.mark.parametrize(("body", "code", "param"), [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    ({"model": "x"}, "missing_required_parameter", "messages"),
    ({"model": "x", "messages": []}, "invalid_parameter", "messages"),
    ({**CHAT, "n": 3}, "invalid_parameter", "n"),
    ({**CHAT, "max_tokens": -5}, "invalid_parameter", "max_tokens"),
])
def test_parse_refuses_a_bad_body_in_openai_shape(body, code, param):
    assert wire(refused(Parse(), context(body))) == (400, code, param)


def test_parse_keeps_what_later_stages_read():
    ctx = context({"model": "m", "stream": True, "max_completion_tokens": 9,
                   "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]})
    run(Parse()(ctx))
    assert ctx.model == "m" and ctx.ask == "Why?" and ctx.prompt_text == "Be brief.\nWhy?" and ctx.max_tokens == 9
    assert "model" not in ctx.body and "stream" not in ctx.body and ctx.body["max_tokens"] == 9
    done = context({"model": "m", "prompt": "Once"}, endpoint="completions")
    run(Parse()(done))
    assert done.ask == "Once" and done.max_tokens == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(("tenant", "headers", "status", "code", "param"), [
    ("basic", {"x_keel_data_class": "pii"}, 403, "data_class_not_allowed", "x-keel-data-class"),
    ("acme", {"x_keel_data_class": "public"}, 403, "data_class_not_allowed", "x-keel-data-class"),
    ("acme", {"x_keel_data_class": "secret"}, 400, "invalid_data_class", "x-keel-data-class"),
    ("basic", {"x_keel_zone": "eu"}, 403, "zone_not_allowed", "x-keel-zone"),
    ("acme", {"x_keel_data_class": "phi", "x_keel_zone": "eu"}, 403, "zone_not_allowed", "x-keel-zone"),
])
def test_scope_refuses_more_than_the_tenant_may(tenant, headers, status, code, param):
    ctx = context(key={"acme": "good-key", "basic": "basic-key"}[tenant], **headers)
    run(through([Authenticate(Keys(), TENANTS), Parse()], ctx))
    assert wire(refused(Scope(POLICY), ctx)) == (status, code, param)


def test_scope_settles_the_class_and_its_zones():
    assert (parsed().data_class, parsed().zones) == (DataClass.internal, ["us", "eu"])
    strict = parsed(x_keel_data_class="PII")
    assert (strict.data_class, strict.zones) == (DataClass.pii, ["eu"])
    assert parsed(tenant="basic").zones == ["us"]


# -- admit ----------------------------------------------------------------------------------------


def test_admit_refuses_at_capacity_then_applies_the_tenants_rate_limit():
    from keel.ratelimit import RateLimiter

    clock = Clock()
    admission, limiter = Admission(limit=2, retry_after_s=3), RateLimiter(clock=clock)
    admit = Admit(admission, limiter)
    admission.in_flight = 2
    full = refused(admit, parsed())
    assert wire(full) == (429, "overloaded", None) and full.retry_after == 3
    admission.in_flight = 0
    first = parsed(tenant="basic")
    run(admit(first))
    assert first.charged == len(first.prompt_text) // 4 + 1 + DEFAULT_MAX_TOKENS
    second = parsed(tenant="basic")
    limited = refused(admit, second)
    assert wire(limited) == (429, "rate_limit_exceeded", None) and 1 <= limited.retry_after <= 60
    assert "tenant 'basic' is over its rate limit (1 requests" in limited.message and second.charged == 0
    # OpenAI's headers, on the answer and on the refusal alike (reply sends ctx.headers with either)
    assert first.headers["x-ratelimit-limit-requests"] == "1" and first.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-reset-requests"] == "1m0s" and "x-ratelimit-limit-tokens" not in second.headers
    unlimited = parsed()
    run(admit(unlimited))
    assert not [h for h in unlimited.headers if h.startswith("x-ratelimit")]  # acme has no limit: nothing to say
    clock.t += 60
    run(admit(parsed(tenant="basic")))  # a minute later: admitted again


def test_the_evaluation_tenants_requests_do_not_use_a_user_tenants_budget():
    from keel.ratelimit import RateLimiter

    admit = Admit(Admission(limit=8, retry_after_s=1), RateLimiter(clock=Clock()))
    run(admit(parsed(tenant="evals")))
    assert wire(refused(admit, parsed(tenant="evals"))) == (429, "rate_limit_exceeded", None)  # its own limit
    user = parsed(tenant="basic")
    run(admit(user))  # 1 request per minute each: the evaluation's did not count against basic's
    assert user.charged > 0


# -- prompt ---------------------------------------------------------------------------------------


class Pools:
    """The registry's pools as the board reads them (keel.feedback.prompts.PromptSource)."""

    def __init__(self, pools: dict) -> None:
        self._pools = pools

    def pools(self) -> dict:
        return self._pools

    def close(self) -> None:
        pass


def board(**pools):
    from keel.feedback.variants import VariantBoard

    b = VariantBoard(Pools(pools), lambda: {}, refresh_s=60, start=False)
    b.refresh()
    return b


def test_prompt_puts_an_aliases_variant_first_and_leaves_rag_and_target_requests_to_their_own():
    from keel.feedback.prompts import Variant
    from serving.request.prompt import Prompt

    brief = Variant("keel-auto", 3, "Answer briefly.")
    prompt = Prompt(board(**{"keel-auto": [brief]}))
    ctx = parsed()
    run(prompt(ctx))
    assert ctx.variant == brief and ctx.body["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert ctx.body["messages"][1:] == CHAT["messages"] and ctx.prompt_text.startswith("Answer briefly.\n")
    rag = parsed({**CHAT, "rag": True})
    run(prompt(rag))  # keel-rag: no registry here, its built-in text; ground writes it with the passages
    assert rag.variant == Variant("keel-rag", 0, RAG_PROMPT) and rag.body["messages"] == CHAT["messages"]
    named = parsed({**CHAT, "model": "primary"})
    run(prompt(named))
    assert named.variant is None and named.body["messages"] == CHAT["messages"]


def test_prompt_gives_the_variant_a_caller_asks_for_from_the_pool_only():
    from keel.feedback.prompts import Variant
    from serving.request.prompt import Prompt

    a, b = Variant("keel-auto", 1, "A."), Variant("keel-auto", 2, "B.")
    prompt = Prompt(board(**{"keel-auto": [a, b]}))
    for _ in range(5):
        ctx = parsed(**{"x-keel-prompt": "keel-auto@2"})
        run(prompt(ctx))
        assert ctx.variant == b
    for asked in ("keel-auto@7", "keel-rag@1", "keel-auto", "nope@1"):
        assert wire(refused(prompt, parsed(**{"x-keel-prompt": asked}))) == (400, "invalid_parameter",
                                                                              "x-keel-prompt"), asked


# -- ground ---------------------------------------------------------------------------------------


def test_ground_retrieves_in_the_request_zones_with_the_classes_it_may_carry():
    asked = []

    def search(query, zones, k, classes=None, tenant=None):
        asked.append((query, list(zones), k, classes, tenant))
        return [Hit("c1", "d1", "policy.md", "Refunds", "Refunds within 30 days.", 0.12345, "us", "public")]

    ctx = parsed({**CHAT, "rag": True})
    run(Ground(search, POLICY, 3, rag_zone="us")(ctx))
    # Of the sources its tenant may read only: retrieval is scoped by the caller's tenant, never unscoped.
    assert asked == [("Hi, I am Maria.", ["us"], 3, ["public", "internal"], "acme")]
    system = ctx.body["messages"][0]
    assert system == {"role": "system", "content": RAG_PROMPT + "[1] Refunds within 30 days."}
    (start, end), = ctx.passages[0]  # where the passage lies: the guard reads it on its own
    assert system["content"][start:end] == "Refunds within 30 days."
    assert ctx.citations == [{"n": 1, "chunk_id": "c1", "doc_id": "d1", "source": "policy.md", "title": "Refunds",
                              "zone": "us", "data_class": "public", "distance": 0.1235}]
    assert ctx.prompt_text.startswith(RAG_PROMPT)
    plain = parsed()
    run(Ground(search, POLICY, 3, None)(plain))
    assert len(asked) == 1 and plain.citations is None  # not a RAG request: untouched


# -- route ----------------------------------------------------------------------------------------


def router(*targets: FakeTarget, clock: Clock | None = None) -> Router:
    return Router(states(*targets, clock=clock), "latency", Weights(), 0.5, retry_after_s=1)


def test_route_ranks_the_targets_in_the_requests_zones():
    ctx = parsed(x_keel_data_class="pii")
    run(router(FakeTarget("us-1"), FakeTarget("eu-1", "eu"))(ctx))
    assert ctx.route.ranked == ("eu-1",) and str(ctx.route.excluded["us-1"]) == "residency: zone us not allowed"


def test_route_maps_each_exclusion_to_its_error():
    us, eu = FakeTarget("us-1"), FakeTarget("eu-1", "eu")
    assert wire(refused(router(us), parsed({**CHAT, "model": "nope"}))) == (404, "model_not_found", "model")
    named = refused(router(us, eu), parsed({**CHAT, "model": "us-1"}, x_keel_data_class="pii"))
    assert wire(named) == (403, "residency", "model") and "runs in zone 'us'" in named.message
    nowhere = refused(router(us), parsed(x_keel_data_class="pii"))
    assert wire(nowhere) == (403, "residency", None) and "(['eu'])" in nowhere.message
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert wire(refused(router(us), parsed({**CHAT, "tools": tools}))) == (400, "unsupported_parameter", "tools")
    small = FakeTarget("small", ctx=500)
    assert wire(refused(router(small), parsed())) == (400, "context_length_exceeded", "messages")


def test_content_parts_go_only_to_a_target_that_reads_them_and_an_unknown_part_is_refused():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}
    text_only, seeing = FakeTarget("text-only"), FakeTarget("seeing")
    seeing.config = seeing.config.model_copy(update={"supports": ["images"]})
    e = refused(router(text_only), parsed(body))  # never dropped: the caller hears which part no target reads
    assert wire(e) == (400, "unsupported_parameter", "messages") and "image_url content parts (images)" in e.message
    ctx = parsed(body)
    run(router(text_only, seeing)(ctx))
    assert ctx.route.ranked == ("seeing",) and str(ctx.route.excluded["text-only"]).startswith("capability")
    odd = refused(Parse(), context({**CHAT, "messages": [{"role": "user", "content": [{"type": "video", "v": 1}]}]}))
    assert wire(odd) == (400, "invalid_parameter", "messages.0.content") and "'video'" in odd.message


def test_route_says_no_healthy_target_with_the_breakers_retry_after():
    clock = Clock()
    r = router(FakeTarget("us-1"), clock=clock)
    r.states["us-1"].breaker.failure()  # opens it (1 failure), cooling down for 10 s
    clock.t += 2.5
    down = refused(r, parsed())
    assert wire(down) == (503, "no_healthy_target", None) and down.retry_after == 8
    assert "Keel never sends it to another zone" in down.message


# -- protect --------------------------------------------------------------------------------------


class Pseudonymizes:
    data_classes = POLICY.data_classes
    kept_entities = POLICY.kept_entities

    def __init__(self, answer: bool) -> None:
        self.answer = answer

    def pseudonymizes(self, data_class, kinds) -> bool:
        return self.answer


def routed(**http) -> RequestContext:
    ctx = parsed(**http)
    run(router(FakeTarget("us-1"), FakeTarget("eu-1", "eu"))(ctx))
    return ctx


def test_protect_pseudonymizes_what_targets_see_and_fails_closed():
    kinds = {"us-1": "openai", "eu-1": "openai"}
    ctx = routed()
    run(Protect(FakeGuard(), Pseudonymizes(True), kinds)(ctx))
    assert "Maria" not in json.dumps(ctx.body) and ctx.actions.pseudonymized and ctx.actions.entities == {"PERSON": 1}
    assert ctx.answer_guard is not None
    failed = refused(Protect(FakeGuard(fails=True), Pseudonymizes(True), kinds), routed())
    assert wire(failed) == (500, "guard_failed", None) and "not sent to any model" in failed.message
    passed = routed()
    run(Protect(FakeGuard(), Pseudonymizes(False), kinds)(passed))
    assert "Maria" in json.dumps(passed.body) and not passed.actions.pseudonymized and passed.answer_guard is not None
    off = routed()
    run(Protect(None, POLICY, kinds)(off))
    assert off.answer_guard is None and "Maria" in json.dumps(off.body)


def test_protect_refuses_content_it_cannot_pseudonymize_unless_the_class_may_send_it():
    """An image may show a face or an ID card: where the class is pseudonymized it is refused (never sent
    unread), unless the class is declared free of personal data and lets such parts through."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi, I am Maria."}, image]}]}
    seeing = FakeTarget("us-1")
    seeing.config = seeing.config.model_copy(update={"supports": ["images"]})

    def ready_ctx() -> RequestContext:  # acme's default class: internal
        ctx = parsed(body)
        run(router(seeing)(ctx))
        return ctx

    for kind in ("openai", "llama_cpp"):  # internal is pseudonymized for every target by default
        e = refused(Protect(FakeGuard(), POLICY, {"us-1": kind}), ready_ctx())
        assert wire(e) == (403, "content_not_pseudonymizable", "messages")
        assert e.message.startswith("image_url content parts cannot be pseudonymized, and data class 'internal'")
    sends = POLICY.data_classes[DataClass.internal].model_copy(update={"unreadable_parts": "send"})
    rules = {**POLICY.data_classes, DataClass.internal: sends}
    ctx = ready_ctx()
    run(Protect(FakeGuard(), POLICY.model_copy(update={"data_classes": rules}), {"us-1": "openai"})(ctx))
    assert ctx.actions.pseudonymized and ctx.body["messages"][0]["content"] == [
        {"type": "text", "text": "Hi, I am <PERSON_1>."}, image]
    with pytest.raises(ValueError, match="pii.unreadable_parts: images, audio and files of personal data"):
        Policy.model_validate(POLICY.model_dump() | {"data_classes": {
            **POLICY.model_dump()["data_classes"], "pii": {"allowed_zones": ["eu"], "unreadable_parts": "send"}}})


# -- generate -------------------------------------------------------------------------------------


LIMITS = Limits(request_timeout_s=5, first_token_timeout_s=1, stall_timeout_s=1)


def generate(*targets: FakeTarget, admission: Admission | None = None) -> tuple[Generate, Admission]:
    admission = admission or Admission(8, 1)
    return Generate(states(*targets), LIMITS, admission, retry_after_s=1), admission


def ready(*targets: FakeTarget, tenant: str = "acme", **http) -> RequestContext:
    ctx = parsed(tenant=tenant, **http)
    run(router(*targets)(ctx))
    return ctx


async def answer(gen: Generate, ctx: RequestContext) -> str:
    await gen(ctx)
    text = ctx.first.text + "".join([c.text async for c in ctx.rest])
    await gen.release(ctx)
    return text


def test_generate_fails_over_before_the_first_token_and_releases_its_slot():
    broken = FakeTarget("us-1", fail=TargetError("server", "boom", status=500))
    backup = FakeTarget("us-2")
    gen, admission = generate(broken, backup)
    ctx = ready(broken, backup)
    assert run(answer(gen, ctx)) == "Hello there."
    assert ctx.outcome.target == "us-2" and [f["target"] for f in ctx.outcome.failovers] == ["us-1"]
    assert admission.in_flight == 0 and ctx.stream is None


def test_generate_continues_a_cut_answer_on_the_next_target():
    cut = FakeTarget("us-1", words=("Hello", " there", " again."), fail=TargetError("cut", "dropped"), after=2)
    backup = FakeTarget("us-2", words=("Hello there", " again."))  # repeats what was sent: trimmed
    gen, _ = generate(cut, backup)
    ctx = ready(cut, backup)
    assert run(answer(gen, ctx)) == "Hello there again."
    assert backup.bodies[-1]["continue_from"] == "Hello there"
    assert ctx.outcome.failovers[0] | {"message": ""} == {"target": "us-1", "error": "cut", "message": "",
                                                            "after_chars": 11}


def test_generate_with_no_target_left_is_a_503_naming_the_zones():
    fail = TargetError("server", "boom", status=500)
    a, b = FakeTarget("us-1", fail=fail), FakeTarget("us-2", fail=fail)
    gen, admission = generate(a, b)
    ctx = ready(a, b, x_keel_zone="us")
    down = refused(gen, ctx)
    assert wire(down) == (503, "all_targets_failed", None) and down.retry_after >= 1
    assert "zones ['us']" in down.message and "us-1: server; us-2: server" in down.message
    assert admission.in_flight == 0 and ctx.outcome.target is None


def test_generate_passes_a_targets_client_error_on_as_it_came():
    body = {"error": {"message": "prompt too long", "code": "context_length_exceeded", "param": "messages"}}
    picky = FakeTarget("us-1", fail=TargetError("client", "400", status=400, body=body))
    gen, _ = generate(picky, FakeTarget("us-2"))
    e = refused(gen, ready(picky))
    assert wire(e) == (400, "context_length_exceeded", "messages") and e.message == "prompt too long"
    assert errors.error_body(e)["error"]["type"] == "invalid_request_error"


def test_generate_when_every_target_is_busy_is_overloaded():
    t = FakeTarget("us-1")
    gen, _ = generate(t)
    gen.states["us-1"].in_flight = 4  # at its max_in_flight
    assert wire(refused(gen, ready(t))) == (429, "overloaded", None)


# -- check ----------------------------------------------------------------------------------------


def test_check_blocks_a_toxic_answer_and_restores_the_callers_values():
    t = FakeTarget("us-1", words=("Dear <PERSON_1>. ", "You are an idiot. ", "More."))
    gen, _ = generate(t)
    ctx = ready(t)
    run(Protect(FakeGuard(), Pseudonymizes(True), {"us-1": "openai"})(ctx))

    async def go() -> list[Chunk]:
        await gen(ctx)
        await Check()(ctx)
        chunks = [c async for c in ctx.rest]
        await gen.release(ctx)
        return chunks

    chunks = run(go())
    assert "".join(c.text for c in chunks) == "Dear Maria." and chunks[-1].finish_reason == "content_filter"
    assert ctx.actions.toxicity_action == "blocked" and ctx.first is None


def test_check_without_the_guard_passes_the_answer_as_it_came():
    ctx = RequestContext(HTTP(), "chat", "r", 0.0)
    ctx.first, ctx.rest = Chunk("a"), object()
    run(Check()(ctx))
    assert ctx.first == Chunk("a")


# -- record ---------------------------------------------------------------------------------------


def recorder(trails: Trails, limiter: Limiter, clock: Clock) -> Record:
    targets = {n: FakeTarget(n, z).config for n, z in (("us-1", "us"), ("eu-1", "eu"))}
    return Record(trails, Metrics({}), limiter, targets, "us", clock, digest_key=KEY)


def test_record_writes_one_audit_record_in_the_answering_targets_zone_and_settles_tokens():
    trails, limiter, clock = Trails(), Limiter(), Clock()
    t = FakeTarget("eu-1", "eu")
    gen, _ = generate(t)
    ctx = ready(t, x_keel_data_class="pii")
    ctx.charged = 600
    run(answer(gen, ctx))
    ctx.status = 200
    clock.t = ctx.started + 0.25
    recorder(trails, limiter, clock)(ctx)
    ((zone, kind, rec),) = trails.records
    assert (zone, kind) == ("eu", "interaction")
    assert {k: rec[k] for k in ("request_id", "tenant", "endpoint", "model", "status", "latency_ms", "target",
                                "data_class", "zone")} == {
        "request_id": "req-1", "tenant": "acme", "endpoint": "chat", "model": "keel/auto", "status": 200,
        "latency_ms": 250.0, "target": "eu-1", "data_class": "pii", "zone": "eu"}
    assert rec["route"]["excluded"] == {} and rec["usage"]["total_tokens"] == 7 and rec["failovers"] == []
    assert len(rec["prompt_hmac"]) == 64 and len(rec["response_hmac"]) == 64
    assert rec["prompt_hmac"] == hmac.new(KEY, canonical(ctx.body), "sha256").hexdigest()  # keyed: not guessable
    assert rec["prompt_hmac"] != hashlib.sha256(canonical(ctx.body)).hexdigest()
    assert rec["guard"] == Actions().record() and "Maria" not in json.dumps(rec)
    assert rec["model_ms"] == round(ctx.outcome.model_s * 1000, 1) and "purpose" not in rec  # a user's request
    assert limiter.settled == [("acme", 600, 7)]
    assert "record" in ctx.timings


def test_record_marks_the_evaluation_tenants_requests():
    trails, limiter, clock = Trails(), Limiter(), Clock()
    t = FakeTarget("us-1")
    gen, _ = generate(t)
    ctx = ready(t, tenant="evals")
    run(answer(gen, ctx))
    recorder(trails, limiter, clock)(ctx)
    ((_, _, rec),) = trails.records
    assert rec["tenant"] == "evals" and rec["purpose"] == "evaluation"


def test_record_of_a_refusal_before_any_target_and_of_an_unknown_caller():
    trails, limiter, clock = Trails(), Limiter(), Clock()
    ctx = parsed(x_keel_zone="eu")
    ctx.fail(errors.ModelNotFoundError("no such model", param="model"))
    recorder(trails, limiter, clock)(ctx)
    ((zone, _, rec),) = trails.records
    assert zone == "eu" and rec["status"] == 404 and "target" not in rec and "route" not in rec
    assert limiter.settled == []  # nothing was charged
    anonymous = context(key=None)
    anonymous.fail(errors.MissingAPIKeyError("missing API key"))
    recorder(trails, limiter, clock)(anonymous)
    assert len(trails.records) == 1  # no tenant to show a record to


# -- the stages together --------------------------------------------------------------------------


def gateway(*targets: FakeTarget, guard: FakeGuard | None = None, clock=None):
    """The gateway's stages and reply over fake targets, as serving.gateway builds them (`clock`: the
    gateway's, a fake one unless given)."""
    from keel.ratelimit import RateLimiter

    sts, trails, clock = states(*targets), Trails(), clock or Clock()
    admission, limiter = Admission(8, 1), RateLimiter()
    gen = Generate(sts, LIMITS, admission, 1)
    stages = [Authenticate(Keys(), TENANTS), Parse(), Scope(POLICY), Admit(admission, limiter),
              Ground(lambda *a: [], POLICY, 4, None), Router(sts, "latency", Weights(), 0.5, 1),
              Protect(guard, Pseudonymizes(True), {n: "openai" for n in sts}), gen, Check()]
    reply = Reply(gen, Record(trails, Metrics(sts), limiter, {n: s.target.config for n, s in sts.items()}, "us",
                              clock, digest_key=KEY))

    async def handle(ctx: RequestContext):
        try:
            await pipeline.run(stages, ctx)
        except errors.KeelError as e:
            return reply.refusal(ctx, e)
        return await reply(ctx)

    return handle, trails, admission


def test_a_whole_answer_and_a_streamed_one_take_the_same_path_and_are_recorded_once():
    handle, trails, admission = gateway(FakeTarget("us-1"), guard=FakeGuard())
    ctx = context()
    whole = run(handle(ctx))
    body = json.loads(whole.body)
    assert whole.status_code == 200 and body["choices"][0]["message"]["content"] == "Hello there."
    assert body["keel"]["route"]["target"] == "us-1" and body["keel"]["guard"]["pseudonymized"]
    assert whole.headers["x-keel-route"].startswith("target=us-1; strategy=latency")
    assert list(ctx.timings) == ["authenticate", "parse", "scope", "admit", "ground", "route", "protect", "generate",
                                 "check", "record"]

    async def events():
        resp = await handle(context({**CHAT, "stream": True}))
        out = [e async for e in resp.body_iterator]
        await resp.background()  # Starlette's, after the body: recorded already, not twice
        return out

    out = run(events())
    assert out[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") for e in out)  # unnamed events only
    chunks = [json.loads(e[6:]) for e in out[:-1]]
    assert all(c["choices"] for c in chunks)  # no usage chunk was asked for: every chunk has its choice
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello there."
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert [("keel" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]  # on the finishing chunk
    assert chunks[-1]["keel"]["route"]["target"] == "us-1"
    assert [r[2]["status"] for r in trails.records] == [200, 200] and admission.in_flight == 0


def test_a_stream_that_asks_for_usage_ends_with_openais_usage_chunk_holding_the_keel_field():
    handle, _, _ = gateway(FakeTarget("us-1"), guard=FakeGuard())

    async def events():
        resp = await handle(context({**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
        return [e async for e in resp.body_iterator]

    out = run(events())
    assert out[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") for e in out)
    *answer, last = [json.loads(e[6:]) for e in out[:-1]]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk" and last["id"] == answer[0]["id"]
    assert set(last["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert last["keel"]["route"]["target"] == "us-1"
    assert all(c["choices"] and "keel" not in c and "usage" not in c for c in answer)
    assert answer[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_whole_chat_answer_carries_openais_required_refusal_field():
    handle, _, _ = gateway(FakeTarget("us-1"))
    message = json.loads(run(handle(context())).body)["choices"][0]["message"]
    assert message["refusal"] is None and message["role"] == "assistant"


def test_a_stage_ending_the_request_is_answered_in_openai_shape_and_recorded():
    handle, trails, _ = gateway(FakeTarget("us-1"))
    ctx = context({**CHAT, "model": "nope"})
    resp = run(handle(ctx))
    assert resp.status_code == 404 and json.loads(resp.body)["error"]["code"] == "model_not_found"
    assert "x-keel-route" not in resp.headers and "route" in ctx.timings and "protect" not in ctx.timings
    assert [r[2]["status"] for r in trails.records] == [404]
    limited = run(handle(context(x_keel_data_class="nope")))
    assert limited.status_code == 400 and "retry-after" not in limited.headers


def test_an_answers_time_is_split_into_the_models_and_keels():
    # On the real clock (generation measures on time.monotonic, the gateway's): the target takes 2 x 60 ms.
    handle, trails, _ = gateway(FakeTarget("us-1", pause_s=0.06), clock=time.monotonic)

    async def keel_of(body: dict) -> tuple[dict, float]:
        arrived = time.monotonic()
        resp = await handle(RequestContext(HTTP(body), "chat", "req-1", arrived))
        if body.get("stream"):  # the last chunk before [DONE]
            keel = json.loads([e async for e in resp.body_iterator][-2].split("data: ", 1)[1])["keel"]
        else:
            keel = json.loads(resp.body)["keel"]
        return keel, (time.monotonic() - arrived) * 1000

    for body in ({**CHAT, "stream": True}, CHAT):
        keel, total_ms = run(keel_of(body))
        assert 120 <= keel["model_ms"] < 1000 and keel["ttft_ms"] <= keel["model_ms"]
        assert 0 <= keel["keel_ms"] < keel["model_ms"]  # fakes all round: the gateway's own time is small
        assert keel["model_ms"] + keel["keel_ms"] <= total_ms + 0.2  # both taken before the reply was over
        assert trails.records[-1][2]["model_ms"] == keel["model_ms"]  # the audit record's is the same


# -- embeddings -----------------------------------------------------------------------------------


def test_embeddings_take_scope_admission_and_the_record_like_chat():
    import numpy as np

    from keel.ratelimit import RateLimiter
    from serving.request.embed import Embed, ParseEmbedding

    trails, clock = Trails(), Clock()
    admit = Admit(Admission(limit=8, retry_after_s=1), RateLimiter(clock=clock))
    stages = [Authenticate(Keys(), TENANTS), ParseEmbedding(), Scope(POLICY), admit,
              Embed(lambda texts: np.ones((len(texts), 4), dtype=np.float32))]
    record = recorder(trails, Limiter(), clock)
    body = {"model": "all-MiniLM-L6-v2", "input": ["Maria's refund", "order 5512"]}

    def embed(tenant_key: str = "good-key", **headers: str) -> RequestContext:
        ctx = RequestContext(HTTP(body, key=tenant_key, **headers), "embeddings", "req-1", 100.0)
        try:
            run(through(stages, ctx))
            ctx.status = 200
        except errors.KeelError as e:
            ctx.fail(e)
        record(ctx)
        return ctx

    ok = embed(x_keel_data_class="pii", x_keel_zone="eu")
    assert ok.status == 200 and len(ok.result["data"]) == 2
    assert trails.records[-1][0] == "eu" and trails.records[-1][2]["data_class"] == "pii"  # audited where it may be
    assert embed(x_keel_zone="mars").status == 403  # a zone the tenant may not use: refused, not answered in us
    assert embed(x_keel_data_class="secret").status == 400
    assert embed(x_keel_data_class="pii", x_keel_zone="us").status == 403  # pii may not go to us
    first = embed("basic-key")
    assert first.status == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
    assert embed("basic-key").status == 429  # the tenant's rate limit counts embeddings too
