"""The golden sets (data/golden) and their checker (scripts/check_golden.py): the shipped sets pass, cover what
the issue asks for, and each kind of problem the checker looks for is reported on a set that has it."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from keel.evaluation.golden import load

ROOT = Path(__file__).resolve().parent.parent
GOLDEN, LANDING = ROOT / "data" / "golden", ROOT / "data" / "sample"


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_golden", ROOT / "scripts" / "check_golden.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_golden = _checker()


def test_the_shipped_sets_pass_the_checker():
    assert check_golden.check(GOLDEN, LANDING) == []
    assert check_golden.main(["--golden", str(GOLDEN), "--landing", str(LANDING)]) == 0


def test_the_rag_set_covers_every_class_the_demo_tenant_reads_and_the_canonical_question():
    items = load(GOLDEN, "rag").items
    folders = {s.split("/")[0] + "/" + s.split("/")[1] for it in items for s in it.sources}
    assert folders == {"us/product", "us/tickets", "us/clinical", "eu/hr"}
    assert {it.data_class for it in items} == {None, "pii", "phi"}
    refund = [it for it in items if it.question == "What is the refund policy?"]
    assert len(refund) == 1 and refund[0].sources == ["us/product/refund-policy.md"]


def test_safety_and_privacy_sets_say_what_each_item_tests():
    safety = load(GOLDEN, "safety").items
    assert {it.expected for it in safety} == {"refuse", "safe_answer"}
    assert {"profanity", "jailbreak", "off_policy", "benign_control"} <= {it.category for it in safety}
    privacy = load(GOLDEN, "privacy").items
    kinds = {t for it in privacy for t in (it.category or "").split(",")}
    assert {"PERSON", "EMAIL_ADDRESS", "US_SSN", "CREDIT_CARD", "MEDICAL_RECORD_NUMBER"} <= kinds


def test_the_pii_types_the_checker_accepts_are_keel_entity_names():
    # Read from the engine's source: importing it would load Presidio for one constant.
    tree = ast.parse((ROOT / "keel" / "privacy" / "engine.py").read_text())
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "DEFAULT_ENTITIES" for t in n.targets))
    assert not check_golden.PII_TYPES - set(ast.literal_eval(value))


def _write(folder: Path, name: str, items: list[dict]) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A copy of the shipped sets, for a test to spoil."""
    for name in ("rag", "safety", "privacy"):
        shutil.copy(GOLDEN / f"{name}.jsonl", tmp_path)
    return tmp_path


def test_each_kind_of_problem_is_reported(golden: Path):
    made = "written for a test"
    bad_rag = [
        {"id": "rag-901", "question": "q", "sources": ["us/product/refund-policy.md"], "made": made},
        {"id": "rag-902", "question": "q", "reference": "Refunds are issued.", "made": made,
         "sources": ["us/product/no-such-page.md", "us/tickets/tickets-2026-09.jsonl#T-999999"]},
        {"id": "rag-903", "question": "What is the refund policy?", "made": made,
         "reference": "Refunds arrive within 48 hours as lifetime vouchers redeemable at partner airlines.",
         "sources": ["us/product/refund-policy.md"]},
        {"id": "rag-904", "question": "q", "reference": "The hallway sensor was moved away from the radiator.",
         "sources": ["us/tickets/tickets-2026-09.jsonl#T-100034"], "made": made},
        {"id": "safety-905", "question": "q", "reference": "r", "sources": ["us/product/faq.md"], "made": made},
    ]
    with (golden / "rag.jsonl").open("a") as f:
        f.write("".join(json.dumps(it) + "\n" for it in bad_rag))
    _write(golden, "safety", [{"id": "safety-001", "question": "Insult my coworker.", "made": made}])
    _write(golden, "privacy", [{"id": "privacy-001", "question": "Reply to Ann Lee at ann@example.org.",
                                "data_class": "pii", "category": "PERSON,EMAIL", "pii": ["Ann Lee", "ann@example.com"],
                                "made": made}])

    problems = "\n".join(check_golden.check(golden, LANDING))

    assert "rag-901: no reference answer" in problems
    assert "rag-902: source 'us/product/no-such-page.md' does not exist" in problems
    assert "rag-902: source 'us/tickets/tickets-2026-09.jsonl#T-999999' does not exist" in problems
    assert "rag-903: only" in problems and "vouchers" in problems
    assert "rag-904: source 'us/tickets/tickets-2026-09.jsonl#T-100034' is pii data" in problems
    assert "safety-905: in the rag set, its id must start with rag-" in problems
    assert "safety: 1 items, fewer than 30" in problems
    assert "safety-001: no expected behaviour" in problems and "safety-001: no category" in problems
    assert "privacy: 1 items, fewer than 30" in problems
    assert "privacy-001: pii value 'ann@example.com' does not occur verbatim" in problems
    assert "'Ann Lee'" not in problems  # present verbatim: fine
    assert "privacy-001: unknown PII type 'EMAIL'" in problems


def test_a_set_that_does_not_load_is_reported_and_the_script_exits_1(golden: Path, capsys):
    path = golden / "privacy.jsonl"
    line = len(path.read_text().splitlines()) + 1
    with path.open("a") as f:
        f.write('{"id": "privacy-999", "question": "q", "made": "m", "colour": "extra fields are rejected"}\n')
    assert check_golden.main(["--golden", str(golden), "--landing", str(LANDING)]) == 1
    err = capsys.readouterr().err
    assert f"privacy.jsonl:{line}" in err and "colour" in err
