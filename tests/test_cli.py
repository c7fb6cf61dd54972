"""`keel pii detect|redact` as a user runs them: JSONL in, exactly one JSONL line out per input."""

import json
import os
import subprocess

import pytest

from .conftest import KEEL, ROOT, run_keel

SAMPLE = {"id": "1", "text": "Call John Smith at 212-555-0199 or john.smith@acme.com"}


def jsonl(out: bytes) -> list[dict]:
    return [json.loads(line) for line in out.decode().splitlines()]


def test_detect_acceptance_example():
    r = run_keel("pii", "detect", input=json.dumps(SAMPLE).encode() + b"\n")
    assert r.returncode == 0, r.stderr
    [line] = jsonl(r.stdout)
    assert line["id"] == "1"
    by_type = {e["type"]: SAMPLE["text"][e["start"] : e["end"]] for e in line["entities"]}
    assert by_type["PERSON"] == "John Smith"
    assert by_type["PHONE_NUMBER"] == "212-555-0199"
    assert by_type["EMAIL_ADDRESS"] == "john.smith@acme.com"
    assert all(set(e) == {"type", "start", "end", "score"} for e in line["entities"])


def test_redact_acceptance_example_and_hashed_mode():
    r = run_keel("pii", "redact", input=json.dumps(SAMPLE).encode())
    assert r.returncode == 0, r.stderr
    [line] = jsonl(r.stdout)
    assert set(line) == {"id", "text"}
    for value in ("John", "Smith", "212-555-0199", "john.smith@acme.com", "555"):
        assert value not in line["text"]
    assert line["text"] == "Call [PERSON] at [PHONE_NUMBER] or [EMAIL_ADDRESS]"
    r = run_keel("pii", "redact", "--mode", "hashed", input=json.dumps(SAMPLE).encode())
    assert "[PERSON:" in jsonl(r.stdout)[0]["text"]
    bad = run_keel("pii", "redact", "--mode", "nope", input=b"")
    assert bad.returncode == 2 and b"typed" in bad.stderr


def test_bad_input_one_line_per_input_nothing_lost(tmp_path):
    lines = [
        json.dumps(SAMPLE).encode(),
        b'{"id": "empty", "text": ""}',
        b'{"id": "utf8", "text": "caf\xe9 owner Jane Doe"}',
        b"\x89PNG\r\x1a\x00\x00binary junk",
        b'{"id": "trunc", "text": "John Smith',
        b'{"id": 42, "text": "Email bob@example.com"}',
        b"[]",
        b'{"id": "late", "text": "Reach me at +44 20 7946 0958"}',
        b"",
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a UTF-8 BOM first, as Windows editors write
    for cmd in ("detect", "redact"):
        r = run_keel("pii", cmd, str(src))
        assert r.returncode == 0, r.stderr
        out = jsonl(r.stdout)
        assert len(out) == len(lines)
        assert [o["id"] for o in out] == ["1", "empty", "utf8", None, "trunc", 42, None, "late", None]
        errors = {o["id"] if o["id"] is not None else f"line{o['line']}": o.get("error") for o in out}
        assert errors["line9"] == "blank line"
        assert errors["empty"] == "empty text"
        assert errors["utf8"].startswith("invalid UTF-8")
        assert errors["line4"] and errors["line7"]
        assert errors["trunc"].startswith("malformed JSON")
        assert errors["1"] is None and errors[42] is None and errors["late"] is None
        if cmd == "redact":
            assert "bob@example.com" not in r.stdout.decode()
            assert "7946" not in r.stdout.decode()


def test_text_above_size_limit_gets_an_error_record(tmp_path):
    cfg = tmp_path / "keel.yaml"
    example = (ROOT / "config" / "keel.example.yaml").read_text()
    cfg.write_text(example.replace("max_text_bytes: 16777216", "max_text_bytes: 2000"))
    records = [{"id": "small", "text": "Ping Jane Doe"}, {"id": "big", "text": "word " * 1000},
               {"id": "after", "text": "ok"}]
    r = run_keel("pii", "detect", "--config", str(cfg), input=b"\n".join(json.dumps(x).encode() for x in records))
    out = jsonl(r.stdout)
    assert [o["id"] for o in out] == ["small", "big", "after"]
    assert "above the limit of 2000" in out[1]["error"] and "error" not in out[2]


def test_missing_input_file_is_a_clear_error(tmp_path):
    r = run_keel("pii", "detect", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and b"cannot read" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)  # spaCy runs at roughly 30-45 s/MB on this PII-dense text
def test_ten_megabyte_text_is_processed_in_chunks(tmp_path):
    para = "Customer Maria Lopez wrote about order 5512 and asked for a callback on 415-555-0133. "
    text = para * (10 * 1024 * 1024 // len(para))
    src = tmp_path / "big.jsonl"
    src.write_text(json.dumps({"id": "big", "text": text}) + "\n" + json.dumps({"id": "next", "text": "Hi Ana"}) + "\n")
    r = run_keel("pii", "redact", str(src), timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    progress = [line for line in r.stderr.decode().splitlines() if line.startswith("keel pii: ")]
    assert len(progress) >= 3 and progress[-1].startswith("keel pii: done, 10.5 MB of text in ")
    assert "MB of text analysed of a 10.5 MB file (~" in progress[0]  # on stderr, every few seconds
    out = jsonl(r.stdout)
    assert [o["id"] for o in out] == ["big", "next"]
    assert "error" not in out[0]
    assert "415-555-0133" not in out[0]["text"] and "Maria Lopez" not in out[0]["text"]
    assert out[0]["text"].count("[PHONE_NUMBER]") == text.count("415-555-0133")


def test_keys_create_list_revoke(tmp_path):
    import json

    from tests.support.services import write_config

    cfg = str(write_config(tmp_path))
    made = run_keel("keys", "create", "--tenant", "demo", "--name", "ci", "-c", cfg)
    assert made.returncode == 0, made.stderr
    key = made.stdout.decode().strip()
    assert key.startswith("keel-") and b"cannot be shown again" in made.stderr
    stored = (tmp_path / "state" / "api_keys.json").read_text()
    assert key not in stored and json.loads(stored)["keys"][0]["tenant"] == "demo"
    key_id = json.loads(stored)["keys"][0]["id"]
    listed = run_keel("keys", "list", "-c", cfg).stdout.decode()
    assert key_id in listed and "active" in listed and key not in listed
    assert run_keel("keys", "revoke", key_id, "-c", cfg).returncode == 0
    assert "revoked" in run_keel("keys", "list", "-c", cfg).stdout.decode()
    assert run_keel("keys", "revoke", key_id, "-c", cfg).returncode == 1
    bad = run_keel("keys", "create", "--tenant", "nobody", "-c", cfg)
    assert bad.returncode == 2 and b"unknown tenant" in bad.stderr


def keel_in(cwd, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`keel` run from a folder of the caller's choosing, with no KEEL_HOME or KEEL_CONFIG to lean on."""
    env = {k: v for k, v in os.environ.items() if k not in ("KEEL_HOME", "KEEL_CONFIG")}
    return subprocess.run([KEEL, *args], capture_output=True, cwd=cwd, env=env, timeout=300)


def test_keel_finds_its_home_from_any_folder_below_it(tmp_path):
    from tests.support.services import write_config

    home = tmp_path / "proj"
    write_config(home)
    below = home / "docs" / "notes"
    below.mkdir(parents=True)
    made = keel_in(home, "keys", "create", "--tenant", "demo")
    assert made.returncode == 0, made.stderr
    key_id = json.loads((home / "state" / "api_keys.json").read_text())["keys"][0]["id"]
    listed = keel_in(below, "keys", "list")
    assert listed.returncode == 0 and key_id in listed.stdout.decode(), listed.stderr
    checked = keel_in(below, "config", "check")
    assert f"{home / 'keel.yaml'}: ok (home {home})".encode() in checked.stdout and b"demo (1 keys)" in checked.stdout
    assert b"home is" not in checked.stderr  # found: nothing to explain


def test_keel_says_which_home_it_uses_when_none_is_found(tmp_path):
    from keel.settings import PROJECT_ROOT

    r = keel_in(tmp_path, "config", "check")
    assert r.returncode == 0, r.stderr
    assert f"no keel.yaml or .keel/ in {tmp_path.resolve()} or above; home is {PROJECT_ROOT}".encode() in r.stderr


def test_audit_verify_fails_when_there_is_no_trail_to_check(tmp_path):
    from tests.support.services import write_config

    r = run_keel("audit", "verify", "-c", str(write_config(tmp_path)))
    assert r.returncode == 1 and b"no audit trail to verify" in r.stderr and b"intact" not in r.stdout


def test_serve_without_a_running_stack_says_so_in_one_line(tmp_path):
    from tests.support.services import write_config

    r = run_keel("serve", "-c", str(write_config(tmp_path)))
    assert r.returncode == 1
    [line] = r.stderr.decode().splitlines()
    assert line.startswith("keel serve: no Ray head of this stack is running") and "keel up" in line


def test_the_gateways_key_ring_and_the_key_store_agree(tmp_path):
    from keel.keys import KeyRing, KeyStore
    from keel.policy import hash_api_key
    from keel.settings import load_settings
    from tests.support.services import write_config

    settings = load_settings(write_config(tmp_path))
    ring, store = KeyRing(settings, recheck_s=0), KeyStore(settings)
    assert store.active() == {} and ring.tenant("keel-nope") is None
    key, rec = store.create("demo")
    assert store.active() == {hash_api_key(key): "demo"} and ring.tenant(key) == "demo"
    store.revoke(rec.id)
    assert store.active() == {} and ring.tenant(key) is None
