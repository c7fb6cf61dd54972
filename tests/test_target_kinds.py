"""Target kinds declare themselves (keel.target_kinds): pure tests, no Ray Serve."""

import importlib
import sys

import pytest
from pydantic import SecretStr

from keel import target_kinds
from keel.errors import ConfigError
from keel.policy import DataClass, ModelTarget, Policy
from keel.routing import Candidate, RouteRequest, plan
from keel.settings import EXAMPLE_CONFIG, GatewaySettings, load_settings
from keel.target_kinds import declared_names, is_external, resolve, validate_targets
from serving.targets import deployment_for, make_target

# A package of its own adding kinds through the entry point group, as a plugin would: no Keel file edited.
PLUGIN = '''
from pydantic import BaseModel, ConfigDict

from keel.target_kinds import TargetKind


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str = "hi"


class EchoTarget:
    def __init__(self, config, options, handle, gateway):
        self.config, self.options, self.handle = config, options, handle


def deployment(config, options):
    return f"app-{config.name}"


KIND = TargetKind(name="echo", external=False, options=EchoOptions, target=EchoTarget, deployment=deployment)
LEAKY = TargetKind(name="leaky", external=True, options=EchoOptions, target=EchoTarget)
'''
ENTRY_POINTS = """[keel.target_kinds]
echo = echo_kinds:KIND
leaky = echo_kinds:LEAKY
broken = echo_kinds_missing:KIND
mislabelled = echo_kinds:LEAKY
"""


@pytest.fixture(autouse=True)
def fresh_registry():
    target_kinds._declared.cache_clear()
    yield
    target_kinds._declared.cache_clear()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "echo_kinds.py").write_text(PLUGIN)
    dist = tmp_path / "echo_kinds-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-kinds\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("echo_kinds", None)


def target(name, kind, supports=(), **options) -> ModelTarget:
    return ModelTarget(name=name, kind=kind, zone="us", price_per_1k_input=0, price_per_1k_output=0, tier="small",
                       max_context=4096, supports=list(supports), options=options)


def policy(*targets: ModelTarget) -> Policy:
    relaxed = {"allowed_zones": ["us"], "pseudonymize": "external_targets"}
    return Policy.model_validate({
        "zones": {"us": {"region": "us-east-1", "storage": "/data/us"}},
        "data_classes": {"public": relaxed, "internal": relaxed, "pii": {"allowed_zones": ["us"]},
                         "phi": {"allowed_zones": ["us"]}},
        "targets": [t.model_dump() for t in targets],
    })


@pytest.mark.parametrize(("name", "module", "external", "options"), [
    ("llama_cpp", "llama_cpp", False, {}),
    ("vllm", "vllm", False, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
    ("openai", "openai_http", True, {"base_url": "https://api.openai.com/v1"}),
])
def test_every_shipped_kind_declares_itself(name, module, external, options):
    kind, parsed = resolve(target("t", name, **options))
    assert kind is importlib.import_module(f"serving.targets.{module}").KIND
    assert kind.name == name and name in declared_names()
    assert kind.external is external and is_external(name) is external
    assert (kind.deployment is None) is external  # in-cluster kinds bring their own Serve deployment
    assert isinstance(parsed, kind.options)


def test_an_undeclared_kind_is_external_and_a_config_error():
    p = policy(target("mystery-model", "mystery"))
    assert not p.pseudonymizes(DataClass.public, ["llama_cpp", "vllm"])
    assert p.pseudonymizes(DataClass.public, ["mystery"])  # fail closed: nobody said it stays in the cluster
    assert p.pseudonymizes(DataClass.public, ["llama_cpp", "mystery"])
    assert validate_targets(p) == ["targets.mystery-model.kind: unknown target kind 'mystery'; declared kinds: "
                                   f"{declared_names()}"]
    with pytest.raises(ConfigError, match="targets.mystery-model.kind: unknown target kind 'mystery'"):
        deployment_for(p.targets[0])
    with pytest.raises(ConfigError, match="unknown target kind"):
        make_target(p.targets[0], None, GatewaySettings())


def test_bad_target_config_is_one_line_naming_the_target_and_the_field():
    p = policy(target("gpt-4o", "openai"), target("typo", "openai", base_url="http://x/v1", bsae_url="http://y"),
               target("small", "llama_cpp", supports=["tools", "response_format"], n_threads=0))
    assert validate_targets(p) == [
        "targets.gpt-4o.options.base_url: Field required",
        "targets.typo.options.bsae_url: Extra inputs are not permitted",
        "targets.small.supports: kind 'llama_cpp' cannot honour 'response_format'",
        "targets.small.options.n_threads: Input should be greater than or equal to 1",
    ]
    with pytest.raises(ConfigError) as e:
        make_target(p.targets[0], None, GatewaySettings())
    assert str(e.value) == "targets.gpt-4o.options.base_url: Field required"
    assert validate_targets(load_settings(EXAMPLE_CONFIG).policy) == []


def test_targets_are_built_from_their_kind_with_typed_options():
    t = make_target(target("gpt-4o", "openai", base_url="http://x/v1/", model="gpt-4o-2024"), None,
                    GatewaySettings(connect_timeout_s=1.5))
    assert (t.base_url, t.model, t.connect_timeout_s) == ("http://x/v1", "gpt-4o-2024", 1.5)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="needs its deployment"):
        make_target(target("small", "llama_cpp"), None, GatewaySettings())
    assert deployment_for(target("gpt-4o", "openai", base_url="http://x/v1")) is None


def test_an_external_key_comes_from_the_deploying_side_never_from_keel_yaml(monkeypatch):
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    keyed = target("gpt-4o", "openai", base_url="http://x/v1", api_key_env="UPSTREAM_KEY",
                   api_key=SecretStr("sk-deployed"))
    assert make_target(keyed, None, GatewaySettings()).headers == {"Authorization": "Bearer sk-deployed"}  # type: ignore[attr-defined]
    assert validate_targets(policy(target("gpt-4o", "openai", base_url="http://x/v1", api_key="sk-plain"))) == [
        "targets.gpt-4o.options.api_key: Value error, keys never live in keel.yaml; name the variable holding it in "
        "api_key_env"]
    with pytest.raises(ConfigError, match="targets.gpt-4o.options.api_key_env: environment variable UPSTREAM_KEY"):
        make_target(target("gpt-4o", "openai", base_url="http://x/v1", api_key_env="UPSTREAM_KEY"), None,
                    GatewaySettings())


def test_a_kind_from_another_package_works_without_editing_keel(plugin):
    assert {"echo", "leaky"} <= set(declared_names())
    p = policy(target("local", "echo", greeting="hello"))
    assert not p.pseudonymizes(DataClass.public, ["echo"]) and p.pseudonymizes(DataClass.pii, ["echo"])
    assert p.pseudonymizes(DataClass.public, ["echo", "leaky"])
    assert validate_targets(p) == []
    assert deployment_for(p.targets[0]) == "app-local"
    built = make_target(p.targets[0], "its-handle", GatewaySettings())
    assert (built.options.greeting, built.handle) == ("hello", "its-handle")  # type: ignore[attr-defined]
    assert validate_targets(policy(target("local", "echo", greeting=3))) == [
        "targets.local.options.greeting: Input should be a valid string"]


def test_a_kind_that_does_not_load_is_external_and_reported(plugin):
    assert is_external("broken") and is_external("mislabelled")
    problems = validate_targets(policy(target("a", "broken"), target("b", "mislabelled")))
    assert problems[0].startswith("targets.a.kind: target kind 'broken' (echo_kinds_missing:KIND) does not load: "
                                  "ModuleNotFoundError")
    assert problems[1] == ("targets.b.kind: entry point 'mislabelled' (echo_kinds:LEAKY) is not a TargetKind named "
                           "'mislabelled'")


def test_the_default_stack_routes_a_tools_request_to_keel_auto_instead_of_refusing_it():
    """The example config's only target, llama.cpp, declares tools (issue 15): keel/auto has somewhere to go."""
    policy = load_settings(EXAMPLE_CONFIG).policy
    assert validate_targets(policy) == []
    route = plan([Candidate(t) for t in policy.targets], RouteRequest(100, 100, needs=frozenset({"tools"})), "latency")
    assert route.ranked == ("smollm2-135m-cpu",) and not route.excluded
