"""Secret hygiene: canary secrets in inputs (secret-named keys and ``SecretStr``), in DSNs and in provider errors
never reach ``operation_runs`` (any column), log output or reason messages; and properties of the sanitizer."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy.engine import make_url

import opspolish
from opspolish.jobs.assignments import FETCH_TYPE
from opspolish.sanitize import (
    _PATTERNS,
    MAX_MESSAGE_CHARS,
    REDACTED,
    might_hold_secrets,
    redact_secrets,
    sanitize_message,
)
from opspolish.settings import Settings
from tests.conftest import WorkerProcess
from tests.reliability.faults import RedisServer, assert_ledger_settled, run_cli
from tests.support.jobs import PROVIDER_CANARIES, SECRETIVE_TYPE

pytestmark = pytest.mark.timeout(90)

CANARIES = {
    "pg_password": "cnryPgDsn7f3a9e",
    "redis_password": "cnryRedisDsn5d1c",
    "secret_str": "cnrySecretStr2b8e4",
    "password_key": "cnryPasswordKey6c0d",
    "nested_client_secret": "cnryNestedClientSecret3e9f",
    "deep_api_key": "cnryDeepApiKey8a7b",
    # Credentials inside text under keys that name no secret: a DSN, a bearer header, a query-string pair, a SAS URL.
    "dsn_in_text": "cnryDsnInText4f2a",
    "bearer_in_text": "cnryBearerInText9c1e",
    "pair_in_text": "cnryPairInText7d3b",
    "sig_in_url": "cnrySigInUrl1a6f",
    **{f"provider_{k}": v for k, v in PROVIDER_CANARIES.items()},
}


def _leaks(text: str) -> list[str]:
    """The canaries in ``text``; every canary contains the stem ``cnry``, so a cut-off one is caught as well."""
    found = [name for name, value in CANARIES.items() if value in text]
    return found or (["a canary's stem"] if "cnry" in text else [])


def _secret_inputs(tag: str, leak: str) -> dict[str, Any]:
    return {"password": CANARIES["password_key"], "tag": tag, "leak": leak,
            "api_token": SecretStr(CANARIES["secret_str"]),
            "options": {"client_secret": CANARIES["nested_client_secret"], "region": "eu",
                        "auth": {"api_key": CANARIES["deep_api_key"]},
                        "source": f"postgresql://reader:{CANARIES['dsn_in_text']}@db.example/app",
                        "headers": [f"Bearer {CANARIES['bearer_in_text']}"],
                        "callback": f"https://hooks.example/done?token={CANARIES['pair_in_text']}&v=1",
                        "blob": f"https://acct.blob.core.windows.net/c/b.csv?sv=2022-11-02&sig={CANARIES['sig_in_url']}"}}


@pytest.fixture
async def canary_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path, password=CANARIES["redis_password"])
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_canaries_never_reach_the_ledger_the_logs_or_reason_messages(
    settings: Settings, canary_redis: RedisServer, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess], capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = make_url(settings.database_url.get_secret_value()).set(password=CANARIES["pg_password"])
    s = canary_redis.settings_for(settings).model_copy(update={
        "database_url": SecretStr(dsn.render_as_string(hide_password=False)), "max_attempts": 2})
    expected: dict[int, tuple[str, str | None]] = {}
    async with opspolish.connect(s) as rt:
        for leak, outcome, code in [("none", "succeeded", None), ("unexpected", "failed", "internal.unexpected"),
                                    ("rejected", "failed", "provider.rejected"),
                                    ("transient", "failed", "provider.unavailable")]:
            r = await opspolish.dispatch(rt, SECRETIVE_TYPE, tenant=tenant, inputs=_secret_inputs(leak, leak))
            expected[r.run_id] = (outcome, code)
        # The same inputs once more: a join must not carry the secrets anywhere either.
        joined = await opspolish.dispatch(rt, SECRETIVE_TYPE, tenant=tenant, inputs=_secret_inputs("none", "none"))
        assert not joined.created
        items = await opspolish.dispatch(rt, FETCH_TYPE, tenant=tenant, inputs={"policy_ids": [str(uuid.uuid4())]})
        expected[items.run_id] = ("failed", "items.all_failed")
        listing = await opspolish.dispatch(rt, FETCH_TYPE, tenant=tenant, inputs={})
        expected[listing.run_id] = ("failed", "provider.unavailable")

    worker = WorkerProcess(s, burst=True, log_path=tmp_path / "worker.log",
                           OPSPOLISH_PROVIDER="tests.support.jobs:LeakyProvider", OPSPOLISH_MAX_ATTEMPTS="2")
    worker_processes.append(worker)
    assert await worker.wait(90) == 0, worker.log()[-3000:]

    rows = {r["id"]: r for r in await assert_ledger_settled(conn)}
    assert {i: (rows[i]["outcome"], rows[i]["reason_code"]) for i in expected} == expected
    for text in await conn.fetch("SELECT row_to_json(o)::text FROM operation_runs o"):
        assert _leaks(text[0]) == [], text[0]
    for run_id, (outcome, _) in expected.items():
        message = rows[run_id]["reason_message"]
        if outcome == "failed" and rows[run_id]["reason_code"] != "items.all_failed":
            # The messages still say what happened: the secrets are cut out of them, not the messages dropped.
            assert REDACTED in message and len(message) <= MAX_MESSAGE_CHARS and "\n" not in message, message
    log = worker.log()
    assert "secretive_started" in log and "item_failed" in log  # the bodies ran and logged
    assert _leaks(log) == [], [line for line in log.splitlines() if _leaks(line)][:5]
    assert _leaks(capsys.readouterr().out) == []

    # The operator's views of the ledger carry none of them either.
    for args in (("runs", "list", "--json"), ("runs", "show", str(next(iter(expected))), "--json")):
        shown = await run_cli(s, *args)
        assert shown.code == 0, shown
        assert _leaks(shown.stdout + shown.stderr) == []


# --- sanitizer properties -----------------------------------------------------------------------------------

_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_token = st.text(alphabet=_TOKEN_CHARS, min_size=14, max_size=40)
_b64url = st.text(alphabet=_TOKEN_CHARS + "-_", min_size=8, max_size=40)
_SECRET_KEYS = ["password", "passwd", "pwd", "secret", "client_secret", "token", "access_token", "refresh_token",
                "api_key", "apikey", "X-Api-Key", "authorization", "auth", "credentials", "private_key",
                "session_id", "cookie", "signature", "DB_PASSWORD", "githubToken", "AWS_SECRET_ACCESS_KEY"]


@st.composite
def _credential(draw: st.DrawFn) -> tuple[str, str]:
    """A credential in one of the shapes errors carry, and the secret part that must not survive."""
    kind = draw(st.sampled_from(["kv", "dsn", "bearer", "jwt", "vendor", "pem"]))
    secret = "Zk" + draw(_token)  # a distinctive prefix: random text around it cannot spell it by chance
    if kind == "pem":  # the key=value rule took only "-----BEGIN" and left the key's body
        label = draw(st.sampled_from(["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED "]))
        prefix = draw(st.sampled_from(["", "private_key=", "key: ", '"key": "']))
        sep = draw(st.sampled_from(["\n", " ", "\\n", "\r\n"]))
        lines = [f"-----BEGIN {label}PRIVATE KEY-----", "MIIEvQIBADAN" + draw(_token), secret, draw(_token) + "=="]
        if draw(st.booleans()):  # or cut short before its END line
            lines.append(f"-----END {label}PRIVATE KEY-----")
        return prefix + sep.join(lines), secret
    if kind == "kv":
        key = draw(st.sampled_from(_SECRET_KEYS))
        sep = draw(st.sampled_from(["=", ": ", " = ", ":"]))
        quote = draw(st.sampled_from(["", "'", '"']))
        value = secret + draw(st.text(alphabet="!@#$%^*()+-./~", max_size=4))
        if quote:
            value += draw(st.sampled_from(["", " with spaces"]))
            keyq = draw(st.sampled_from(["", quote]))
            return f"{keyq}{key}{keyq}{sep}{quote}{value}{quote}", secret
        return f"{key}{sep}{value}", secret
    if kind == "dsn":
        scheme = draw(st.sampled_from(["postgresql", "postgresql+asyncpg", "redis", "rediss", "amqp", "https"]))
        user = draw(st.text(alphabet="abcxyz_", max_size=8))
        password = secret + draw(st.text(alphabet="!$&'()*+,;=%-._~", max_size=4))
        return f"{scheme}://{user}:{password}@db.example:5432/x", secret
    if kind == "bearer":
        scheme = draw(st.sampled_from(["Bearer", "bearer", "Basic", "token"]))
        prefix = draw(st.sampled_from(["", "Authorization: ", "authorization="]))
        return f"{prefix}{scheme} {secret}", secret
    if kind == "jwt":
        jwt = "eyJ" + draw(_b64url) + ".eyJ" + draw(_b64url) + "." + secret
        return jwt, secret
    vendor = draw(st.sampled_from(["ghp_", "gho_", "xoxb-", "sk_live_", "sk_test_"]))
    return vendor + secret, secret


_noise = st.text(max_size=80)


@settings(max_examples=400)
@given(parts=st.lists(st.tuples(_noise, _credential()), min_size=1, max_size=4), tail=_noise)
@example(parts=[("BASIC", ("Bearer QxSecret123", "QxSecret123"))], tail="")  # "Bearer" taken as Basic's credential
def test_sanitizer_removes_generated_credentials_from_any_text(parts: list[tuple[str, tuple[str, str]]],
                                                               tail: str) -> None:
    text = " ".join(f"{noise} {shape}" for noise, (shape, _) in parts) + " " + tail
    out = sanitize_message(text)
    for _, (shape, secret) in parts:
        assert secret not in out, (shape, out)
    assert len(out) <= MAX_MESSAGE_CHARS and "\n" not in out and "\r" not in out
    assert all(ch.isprintable() for ch in out)
    assert sanitize_message(out) == out  # a sanitized message is a fixed point


@settings(max_examples=200)
@given(secret=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=4,
                      max_size=30).map(lambda s: "Qx" + s),
       before=_noise, after=_noise)
def test_sanitizer_removes_known_secret_values_verbatim(secret: str, before: str, after: str) -> None:
    out = sanitize_message(f"{before} {secret} {after}", extra_secrets=(secret,))
    assert secret not in out


@settings(max_examples=200)
@given(text=st.text(max_size=2000))
@example(text="Traceback")
def test_sanitized_messages_are_one_bounded_printable_line(text: str) -> None:
    out = sanitize_message(f"Error: {text}\nTraceback (most recent call last):\n  File 'x', line 1\n")
    assert len(out) <= MAX_MESSAGE_CHARS and "\n" not in out
    # The stack trace is gone; the error's own text may say "Traceback" (hypothesis tries the literals it finds in
    # the code under test, so it does: the check used to fail at random on that word).
    assert "File 'x', line 1" not in out and ("most recent call last" not in out or "most recent call last" in text)
    assert all(ch.isprintable() for ch in out)


# Text built from the secret words' letters in any case (and the Unicode letters that case-insensitive matching
# takes for ASCII ones), so the redaction patterns match often: their cheap pre-check must never say no then.
_pattern_alphabet = st.sampled_from([*"pPaAsSwWoOrRdDtTkKeEnNiIyYcCuUhHlLvVbBgGjJxX_-:=/@. ", "\u0131", "\u017f",
                                     "\u212a", "\u0130", "eyJ", "://", "AKIA", "sk_", "gh"])


@settings(max_examples=500)
@given(text=st.lists(_pattern_alphabet, max_size=40).map("".join))
def test_the_redaction_pre_check_never_skips_text_a_pattern_would_change(text: str) -> None:
    if any(pattern.search(text) for pattern, _ in _PATTERNS):
        assert might_hold_secrets(text), text
    assert redact_secrets(text) == _redact_without_pre_check(text)


def _redact_without_pre_check(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
