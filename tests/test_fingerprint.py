"""Fingerprint properties (hypothesis): deterministic, canonical, secret-free."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from arq.utils import args_to_string
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretBytes, SecretStr

from opspolish.errors import InputInvalid, InputTooLarge
from opspolish.fingerprint import (
    MAX_CANONICAL_BYTES,
    _Budget,
    _canonical,
    _dumps,
    canonical_inputs,
    canonical_json,
    fingerprint,
    identity_hash,
    is_secret_key,
    json_text,
    load_json,
    lock_key,
    secret_values,
)
from opspolish.sanitize import redact_credentials, redact_secrets, sanitize_message

SECRET_KEYS = ["password", "client_secret", "api_key", "X-Api-Key", "authorization", "token", "access_token",
               "credentials", "private_key", "cookie", "db_password", "refreshToken", "password2", "passwords",
               "password_confirmation", "passwordHash", "pwd_hash", "user_pwd", "auth_key", "authKey", "db_pass",
               # a secret word where a word of the key ends, however the words are joined
               "accesstoken", "clientsecret", "secretKey", "githubTokenValue", "refresh_tokens", "csrftoken",
               "sessionId", "x-auth-token", "HTTPToken",
               # kept in fingerprints and context before: a key named for what it signs or encrypts with, a PIN, a
               # one-time code, a passcode, a JWT or bearer credential
               "passcode", "encryption_key", "signing_key", "signingKey", "privkey", "ssh_key", "master_key",
               "hmac_key", "license_key", "pin", "pin_code", "pincode", "user_passcode", "otp", "totp_code", "jwt",
               "id_jwt", "bearer", "cvv", "card_cvc", "security_code", "recovery_codes", "backup_code", "mfa_code",
               "verification_code", "aes_key", "gpg_key", "otpauth_uri"]
# An alphabet that cannot spell a secret-looking key (no c, h, k, o, p, r, s, t, u, w).
safe_keys = st.text(alphabet="abdefgijlmnqvxyz_", min_size=1, max_size=10)
# Text without NUL: inputs cannot hold it (PostgreSQL cannot store it), and fingerprint() refuses it like dispatch.
no_nul = st.characters(exclude_characters="\x00", codec="utf-8")
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(no_nul, max_size=20),
                    st.floats(allow_nan=False, allow_infinity=False), st.uuids())
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(safe_keys, children, max_size=4)), max_leaves=20)
inputs_st = st.dictionaries(safe_keys, values, max_size=6)


@given(inputs_st)
def test_fingerprint_is_invariant_to_key_order(inputs: dict[str, Any]) -> None:
    reordered = dict(reversed(list(inputs.items())))
    assert fingerprint(inputs) == fingerprint(reordered)


@given(inputs_st, st.sampled_from(SECRET_KEYS), st.text(no_nul, min_size=1), st.text(no_nul, min_size=1))
def test_fingerprint_never_changes_when_only_secrets_change(inputs: dict[str, Any], key: str, a: str, b: str) -> None:
    with_a = {**inputs, key: a, "nested": {key: a, "safe": 1}, "s": SecretStr(a)}
    with_b = {**inputs, key: b, "nested": {key: b, "safe": 1}, "s": SecretStr(b)}
    assert fingerprint(with_a) == fingerprint(with_b)
    assert all(not is_secret_key(k) for k in canonical_inputs(with_a)["nested"])


_password = st.text(alphabet="ABCDEFGHabcdefgh0123456789", min_size=6, max_size=24)


@given(inputs_st, safe_keys, st.sampled_from([
    "postgresql://app:{}@db.example:5432/x", "Authorization: Bearer {}", "https://cb.example/?token={}&v=1",
    "host=db user=app password={} dbname=x", "AKIA{}", "Authorization: Basic {}", "PGPASSWORD={}", "github_pat_{}",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEow{}\n-----END RSA PRIVATE KEY-----",
    # Kept, the first two stored in context and moving the fingerprint: a quoted libpq value, and the tail of a URL
    # password with an @ in it (the rule stopped at its first @).
    "host=db user=app password='{}' dbname=x", 'host=db password="{} x" dbname=x', "postgresql://app:p@{}@db/x",
    "aws access_key={}",
    # Kept before: an API-key header's value (only Authorization's was known)
    "X-Api-Key: {}", "x-auth-token: {}", "Api-Key:{}",
]), _password, _password)
def test_credentials_inside_text_under_any_key_are_redacted_and_never_move_the_fingerprint(
    inputs: dict[str, Any], key: str, shape: str, a: str, b: str,
) -> None:
    if shape == "AKIA{}":
        a, b = (a.upper() * 4)[:16], (b.upper() * 4)[:16]
    if shape == "github_pat_{}":  # a fine-grained token: 20 characters or more after its prefix
        a, b = a * 4, b * 4
    with_a, with_b = {**inputs, key: [shape.format(a)]}, {**inputs, key: [shape.format(b)]}
    assert fingerprint(with_a) == fingerprint(with_b)
    assert a not in json.dumps(canonical_inputs(with_a)[key])


def test_an_authorization_headers_scheme_is_kept_and_only_its_credential_redacted() -> None:
    # "Authorization: [redacted] [redacted]": the scheme word was taken for the credential once it was redacted.
    assert redact_credentials("Authorization: Bearer abcdef123456") == "Authorization: Bearer [redacted]"
    assert redact_credentials("authorization: Basic QWxhZGRpbjpvcGVu") == "authorization: Basic [redacted]"
    assert redact_credentials("X-Api-Key: zzzsecretzzz sent") == "X-Api-Key: [redacted] sent"


def test_a_messages_authorization_header_keeps_its_scheme_word() -> None:
    # "Authorization: [redacted] [redacted]": the key=value rule took the scheme word for the credential, once the
    # bearer rule had redacted the credential after it.
    assert sanitize_message("401 with Authorization: Bearer abcdef123456") == (
        "401 with Authorization: Bearer [redacted]")
    assert sanitize_message("authorization=Basic QWxhZGRpbjpvcGVu sent") == "authorization=Basic [redacted] sent"
    assert sanitize_message('headers: {"Authorization": "token ghx1234567890"}') == (
        'headers: {"Authorization": "token [redacted]"}')
    assert sanitize_message('password="[redacted]cnry"') == "password=[redacted]"  # a value that only starts so


def test_a_quoted_secret_with_escaped_quotes_is_redacted_whole() -> None:
    # repr() escapes a quote inside a value ('it\'s "x"'): the rule stopped at the escaped quote, and the rest of
    # the secret stayed in reason messages and log lines.
    text = "bad config " + repr({"password": "it's \"cnryQuoted\" x", "region": "eu"})
    assert sanitize_message(text) == "bad config {'password': [redacted], 'region': 'eu'}"
    assert sanitize_message('{"token": "a\\"b cnryEscaped", "n": 2}') == '{"token": [redacted], "n": 2}'


def test_a_word_that_only_contains_sig_is_no_secret_name_in_messages() -> None:
    # "..._sigconv:[redacted]": a job id whose queue or database name held "sig" lost its run number in every line.
    job = "opspolish-test:audit_wk_sigconv:run:1"
    assert sanitize_message(f"job_id={job} design: v2") == f"job_id={job} design: v2"
    assert sanitize_message("sig: abcdef123 url_sig=abcdef123 sigs=abcdef123") == (
        "sig: [redacted] url_sig=[redacted] sigs=[redacted]")


def test_a_signed_urls_signature_is_left_out_of_fingerprint_and_context() -> None:
    # An Azure SAS, S3 or CloudFront URL grants what it points at until it expires: its signature was recorded in
    # context and fingerprinted, so the same blob with a fresh signature was another identity.
    def sas(sig: str, blob: str = "report.csv") -> str:
        return f"https://acct.blob.core.windows.net/c/{blob}?sv=2022-11-02&se=2026-12-07&sp=r&sig={sig}"

    assert fingerprint({"url": sas("AbC%2Bdef%3D")}) == fingerprint({"url": sas("ZzZ%2Fxyz%3D")})
    assert fingerprint({"url": sas("AbC%2Bdef%3D")}) != fingerprint({"url": sas("AbC%2Bdef%3D", "other.csv")})
    assert canonical_inputs({"url": sas("AbC%2Bdef%3D")})["url"] == sas("[redacted]")
    s3 = "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=deadbeef01&X-Amz-Expires=60"
    assert canonical_inputs({"u": [s3]})["u"] == [s3.replace("deadbeef01", "[redacted]")]
    cloudfront = "https://d1.cloudfront.net/a.mp4?Expires=1&Signature=abc~def_&Key-Pair-Id=K2"
    assert "abc~def_" not in canonical_json({"u": cloudfront}) and "Key-Pair-Id=K2" in canonical_json({"u": cloudfront})


def test_ordinary_text_that_only_resembles_a_credential_is_kept_verbatim() -> None:
    assert canonical_inputs({"t": "sent Bearer abc123def456"})["t"] == "sent Bearer [redacted]"
    assert canonical_inputs({"t": "Bearer " + "q" * 24})["t"] == "Bearer [redacted]"
    text = ["Basic Compliance", "design: v2", "max_tokens=100", "tokenizer=bert", "https://example.com:8443/a@b",
            "token rotation policy", "signature: approved by ops", "signature=approved", "design?sigma=2",
            "bypass=true", "compass=north", "Flag bearer training", "bearer bonds1", "Bearer of bad-news",
            "Authorization header required", "api-key rotation: weekly"]
    assert canonical_inputs({"t": text})["t"] == text


def test_a_key_that_is_not_valid_utf8_is_refused_naming_its_place() -> None:
    with pytest.raises(InputInvalid) as err:
        fingerprint({"outer": {"\ud800": 1}})
    assert err.value.field == "inputs.outer" and "not valid UTF-8" in str(err.value)


@given(inputs_st, safe_keys, scalars, scalars)
def test_fingerprint_differs_when_a_non_secret_value_differs(inputs: dict[str, Any], key: str, a: Any, b: Any) -> None:
    ca, cb = canonical_inputs({"v": a}), canonical_inputs({"v": b})
    if ca == cb:
        return  # equal values in different spellings (1 and 1.0) must agree, tested below
    assert fingerprint({**inputs, key: a}) != fingerprint({**inputs, key: b})


@given(st.integers(-(10**12), 10**12))
def test_equal_numbers_in_different_spellings_agree(n: int) -> None:
    assert fingerprint({"n": n}) == fingerprint({"n": float(n)}) == fingerprint({"n": Decimal(n) / 1})
    assert fingerprint({"n": Decimal("0.10")}) == fingerprint({"n": 0.1}) == fingerprint({"n": Decimal("0.1")})


class Color(enum.Enum):
    RED = "red"


def test_equal_values_in_other_types_agree() -> None:
    u = uuid.uuid4()
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert fingerprint({"u": u, "t": t, "c": Color.RED, "l": (1, 2), "s": {3, 1}}) == fingerprint(
        {"u": str(u), "t": t.astimezone(dt.UTC), "c": "red", "l": [1, 2], "s": [1, 3]})
    assert fingerprint({"u": str(u).upper()}) != fingerprint({"u": u})  # text is text: no guessing


@pytest.mark.parametrize(("inputs", "path"), [
    ({"x": math.nan}, "inputs.x"),
    ({"a": {"b": [1, math.inf]}}, "inputs.a.b[1]"),
    ({"x": Decimal("NaN")}, "inputs.x"),
    ({"when": dt.datetime(2026, 1, 1)}, "inputs.when"),
    ({"blob": b"\x00\x01"}, "inputs.blob"),
    ({"obj": object()}, "inputs.obj"),
    ({"s": "\udcff"}, "inputs.s"),
    ({1: "int key"}, "inputs"),
])
def test_bad_values_are_refused_with_their_path(inputs: dict[Any, Any], path: str) -> None:
    with pytest.raises(InputInvalid) as info:
        fingerprint(inputs)
    assert info.value.reason_code == "input.invalid"
    assert info.value.field == path


def test_deep_nesting_and_huge_payloads_are_refused() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["d"] = {}
        node = node["d"]
    with pytest.raises(InputInvalid, match="nested deeper"):
        fingerprint(deep)
    with pytest.raises(InputInvalid, match="larger than"):
        fingerprint({"blob": "x" * 1_000_000})


class _CountingList(list[Any]):
    """A list that counts how many of its items were read."""

    read = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self.read += 1
            yield item


def test_a_huge_payload_is_refused_after_reading_about_the_cap_not_all_of_it() -> None:
    items = _CountingList(range(1_000_000))
    with pytest.raises(InputInvalid, match="larger than 65536 bytes") as err:
        fingerprint({"ids": items})
    assert err.value.field == "inputs" and items.read < MAX_CANONICAL_BYTES + 1


@settings(max_examples=200)
@given(st.lists(st.one_of(st.text(no_nul, min_size=0, max_size=3_000), st.integers(), st.none(),
                          st.dictionaries(safe_keys, st.text(no_nul, max_size=2_000), max_size=3)), max_size=60))
@example(values=["a" * (MAX_CANONICAL_BYTES - 10)])  # '{"v":["' and '"]}' make it exactly the cap
@example(values=["a" * (MAX_CANONICAL_BYTES - 9)])  # one byte over
@example(values=["é" * 40_000])  # under the cap in characters, over it in bytes
@example(values=[{"k": "x" * 30_000}, "y" * 30_000, None, 7])
def test_the_early_refusal_agrees_with_the_canonical_size(values: list[Any]) -> None:
    unbounded = _Budget()
    unbounded.left = 10**12
    size = len(_dumps(_canonical({"v": values}, "inputs", 0, unbounded)).encode("utf-8"))
    if size <= MAX_CANONICAL_BYTES:
        assert len(canonical_json({"v": values}).encode("utf-8")) == size
    else:
        with pytest.raises(InputInvalid, match="larger than"):
            canonical_json({"v": values})


@given(inputs_st)
@example(inputs={"a": [1, "é\n\u2028", None, True], "b": {"z": 2**80, "a": ""}})  # json.dumps spells it
@example(inputs={"a": [0.5, 1.0], "b": {"c": Decimal("2.50")}})  # a Decimal is left: _dumps spells it
def test_the_fast_spelling_of_the_canonical_text_is_the_exact_one(inputs: dict[str, Any]) -> None:
    """canonical_json spells a tree with no Decimal in it with json.dumps; _dumps spells any tree and is the
    definition of the canonical text."""
    assert canonical_json(inputs) == _dumps(_canonical(inputs, "inputs", 0, _Budget()))


@settings(max_examples=25)
@given(inputs_st)
def test_fingerprint_is_identical_in_another_process_with_another_hash_seed(inputs: dict[str, Any]) -> None:
    text = json.dumps(canonical_inputs(inputs))
    code = "import json,sys; from opspolish.fingerprint import fingerprint; print(fingerprint(json.loads(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == fingerprint(inputs)


def test_lock_key_is_a_signed_64_bit_integer_from_the_identity() -> None:
    h = identity_hash(f"tenant:{uuid.uuid4()}", "t", fingerprint({}))
    key = lock_key(h)
    assert -(2**63) <= key < 2**63
    assert lock_key("f" * 64) == -1 and lock_key("7" + "f" * 63) == 2**63 - 1


@pytest.mark.timeout(30)  # a hang guard, not a speed target: before, the first case alone took minutes
@pytest.mark.parametrize("unit", ["password-", "a.b+c-", "x://", "password ", "_token_"])
def test_redaction_of_long_repetitive_text_ends_and_still_redacts(unit: str) -> None:
    """Repeated words made the redaction patterns backtrack cubically: 5.4 KB of "password-" took 45 s in
    sanitize_message, and a CLI argument or a raw delivery's tenant id froze the command or the worker."""
    text = unit * (60_000 // len(unit)) + " api_key=Hunter2Canary postgres://u:PwCanary@h/db"
    assert len(sanitize_message(text)) == 500  # the whole text redacted first, then cut
    for redact in (redact_secrets, redact_credentials):
        out = redact(text)
        assert "Hunter2Canary" not in out and "PwCanary" not in out, redact.__name__
        assert out.startswith(unit * 10)


@pytest.mark.parametrize(("inputs", "kept"), [
    ({"credentials": {"user": "admin", "key": "CnryCred"}, "n": 1}, "'n': 1"),
    ({"auth": {"type": "basic", "pw": "CnryAuth"}, "n": 4}, "'n': 4"),
    ({"password": ["CnryList1", "CnryList2"], "n": 3}, "'n': 3"),
    ({"secret": ("CnryTuple", {"deeper": ["CnryDeep"]}), "n": 5}, "'n': 5"),
    ({"access_key": "CnryAccess", "n": 2}, "'n': 2"),
    ({"api_key": {"note": "]} 'x'", "v": "CnryQuoted"}, "n": 6}, "'n': 6"),
])
def test_a_secret_keys_container_is_redacted_whole_in_arqs_argument_text(inputs: dict[str, Any], kept: str) -> None:
    # arq's start line prints a job's arguments as repr (arq.utils.args_to_string): the key=value rule took one token,
    # so a mapping under "credentials" or "auth" (whose own keys name no secret) was printed whole, a list under
    # "password" from its second item on, and access_key not at all.
    text = args_to_string((), {"inputs": inputs, "run_id": 7})
    for cut in (text, text[:40]):  # arq cuts the text at 80 characters: a container may have no end
        out = redact_secrets(cut)
        assert "Cnry" not in out, out
        assert redact_secrets(out) == out
    assert kept in redact_secrets(text) and "run_id=7" in redact_secrets(text)


@pytest.mark.timeout(30)  # a hang guard
def test_redacting_many_unclosed_secret_containers_ends() -> None:
    text = "password: [" * 20_000 + "x"
    assert redact_secrets(text) == "password: [redacted]"


@given(st.sampled_from(["max_tokens", "token_count", "tokens", "cookie_consent", "signature_required",
                        "secret_santa_rounds", "session_id"]),
       st.one_of(st.integers(0, 10**9), st.floats(0, 2.0), st.booleans()),
       st.one_of(st.integers(0, 10**9), st.floats(0, 2.0), st.booleans()))
def test_a_number_or_flag_under_a_secret_word_is_a_setting_kept_in_the_identity(key: str, a: Any, b: Any) -> None:
    # max_tokens was left out as a secret: max_tokens=10 and max_tokens=4000 were one identity, the second
    # dispatch joined the first, and the run (or its re-enqueue) went on with the first value, or the default.
    assert key in canonical_inputs({key: a})
    assert (fingerprint({"prompt": "hi", key: a}) == fingerprint({"prompt": "hi", key: b})) == (
        canonical_json({key: a}) == canonical_json({key: b}))
    assert secret_values({key: a}) == ()


@pytest.mark.parametrize(("key", "value"), [("password", 123456), ("pin_pwd", 4321), ("db_pass", 2.5),
                                            ("passphrase", True), ("token", "abcdef"), ("max_tokens", "abcdef"),
                                            ("client_secret", ["abc", "def"]), ("session_id", {"v": "abc"})])
def test_text_under_a_secret_word_and_anything_under_a_password_key_stay_secrets(key: str, value: Any) -> None:
    assert canonical_inputs({key: value, "x": 1}) == {"x": 1}


@pytest.mark.parametrize("key", ["passenger", "passage_count", "author", "session", "sig_figs", "compass",
                                 "bypass_cache", "tokenizer", "secretary", "tokenizerName", "cookiecutter_template",
                                 "signing_key_id", "design_key", "spinner", "potpourri", "pinned", "keyboard",
                                 "monkey", "sort_key", "partition_key", "jwt_issuer",
                                 # settings, not secrets: dropped, gpio_pin=4 and gpio_pin=17 were one identity
                                 "pin_version", "pinToTop", "otp_digits", "otp_issuer", "otp_enabled", "totp_period",
                                 "passcode_length", "map_pin_color", "pin_count", "gpio_pin", "user_pin_hint",
                                 "security_code_length", "backup_codes_count", "cvv_required", "gpg_key_id"])
def test_a_key_that_only_contains_a_secret_words_letters_is_no_secret(key: str) -> None:
    assert not is_secret_key(key)


def test_keys_that_name_a_secret_in_more_words_are_secret() -> None:
    """password2, password_confirmation, passwordHash, pwd_hash, auth_key... were kept in fingerprints and context."""
    assert all(is_secret_key(key) for key in SECRET_KEYS), [k for k in SECRET_KEYS if not is_secret_key(k)]


@pytest.mark.timeout(30)  # a hang guard: Decimal("1e1000000") took 25 s of CPU to become an int
@pytest.mark.parametrize("number", [Decimal("1e1000000"), Decimal("-1e4300"), 10**4300, -(10**5000)],
                         ids=["1e1000000", "-1e4300", "10**4300", "-10**5000"])
def test_an_integer_past_4300_digits_is_refused_naming_the_field(number: Any) -> None:
    with pytest.raises(InputInvalid, match=r"^inputs\.a\[1\]: number has more than 4300 digits$"):
        canonical_inputs({"a": [1, number]})


def test_an_integer_past_4300_digits_under_a_secret_key_is_refused_too() -> None:
    # Left out of the identity unread, it was queued: arq's start line could not print it (ValueError in repr), and
    # the worker dropped the job before opspolish saw it, the run left queued with no job.
    looped: list[Any] = [1]
    looped.append(looped)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"password": 10**5000}, 'inputs["password"]'),
        ({"n": 1, "auth": {"pin": [7, -(10**4300)]}}, 'inputs["auth"].pin[1]'),
        ({"api_key": {10**4400: "x"}}, 'inputs["api_key"][]'),
        ({"token": SecretStr("x"), "secret": [looped, (10**4300,)]}, 'inputs["secret"][1][0]')]
    for inputs, path in cases:
        with pytest.raises(InputInvalid, match=rf"^{re.escape(path)}: number has more than 4300 digits$"):
            canonical_inputs(inputs)
    assert canonical_inputs({"password": 10**4299, "secret": [looped], "n": 1}) == {"n": 1}


def test_secret_values_are_held_to_64_kib_in_all_too() -> None:
    # Left out of the canonical form, they escaped its cap: a 50 MB password was queued in Redis and run.
    for inputs in ({"password": "x" * (2**16 + 1)}, {"token": SecretStr("x" * 2**20)},
                   {"keys": [1, SecretStr("k" * 2**15), SecretBytes(b"k" * 2**15 + b"k")]},
                   {"a": {"secret": ["y" * 2**15]}, "b": {"api_key": {"k": "z" * 2**15}}}):
        with pytest.raises(InputTooLarge, match=r"^inputs: secret values larger than 65536 bytes in all$"):
            canonical_inputs(inputs)
    assert canonical_inputs({"password": "x" * 2**15, "api_key": SecretStr("y" * 2**15), "n": 1}) == {"n": 1}


def test_integers_up_to_4300_digits_are_inputs_like_any_other() -> None:
    assert canonical_inputs({"n": 10**4299 + 7, "d": Decimal("9e4299")}) == {"n": 10**4299 + 7, "d": 9 * 10**4299}


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30), st.integers(1, 60))
def test_decimals_that_differ_anywhere_are_other_identities_and_read_back_exact(d: Decimal, shift: int) -> None:
    # normalize() in the default context rounded to 28 digits: 0.123...789 (29 digits) and 0.123...788 were one
    # identity (the second dispatch joined the first's run), and 1e-10000000 and -1e-10000000 were both "0".
    assume(d.adjusted() > -4000)
    other = decimal.Context(prec=200).add(d, Decimal(1).scaleb(d.adjusted() - shift))  # exact: no rounding
    assert fingerprint({"x": d}) != fingerprint({"x": other})
    context = canonical_inputs({"x": other})["x"]
    assert Decimal(str(context)) == other if isinstance(context, float) else context == other


def test_decimals_past_28_digits_and_tiny_ones_keep_their_digits() -> None:
    a, b = Decimal("0.12345678901234567890123456789"), Decimal("0.12345678901234567890123456788")
    assert canonical_json({"a": a}) == '{"a":0.12345678901234567890123456789}'
    assert fingerprint({"a": a}) != fingerprint({"a": b})
    assert canonical_json({"x": Decimal("-1e-4300")}) == '{"x":-0.' + "0" * 4299 + '1}'
    for tiny in (Decimal("1e-10000000"), Decimal("1e-4301"), Decimal("0." + "1" * 17_000)):
        # Written out, ten million characters; past PostgreSQL's 16,383 digits after the point, a driver error and
        # internal.unexpected at dispatch (and no ledger row, no line, for a raw enqueue).
        with pytest.raises(InputInvalid, match=r"^inputs\.x: number has more than 4300 digits after the point$"):
            canonical_json({"x": tiny})


@pytest.mark.timeout(10)  # 60,000 copies of 1E+4299 took 45 s and 600 MB before the size cap refused them
def test_numbers_are_held_to_the_size_cap_as_they_are_written_out() -> None:
    for number in (Decimal("1E+4299"), Decimal("1E-4300")):
        with pytest.raises(InputTooLarge, match=r"^inputs: larger than 65536 bytes once canonical$"):
            canonical_json({"x": [number] * 60_000})


@pytest.mark.parametrize(("text", "number"), [
    ("0.1", 0.1), ("2.5e-07", 2.5e-07), ("1e300", 1e300),  # floats: read back as floats
    ("0.10000000000000000001", Decimal("0.10000000000000000001")),
    ("123456789012345678.5", Decimal("123456789012345678.5")), ("1e400", Decimal("1e400")),
])
def test_numbers_read_back_as_floats_when_a_float_is_exact_else_as_decimals(text: str, number: Any) -> None:
    read = load_json(f'{{"x": {text}}}')["x"]
    assert (type(read), read) == (type(number), number)
    assert load_json(json_text({"x": read})) == {"x": read}


def test_pure_paths_and_equal_aware_times_are_canonical_text() -> None:
    # A pure path raised pydantic's "Unable to serialize unknown type" out of dispatch; 10:05+02:00 and 08:05Z, equal
    # times, were two identities.
    assert canonical_inputs({"p": PurePosixPath("a/b"), "w": PureWindowsPath("c:/x")}) == {"p": "a/b", "w": "c:\\x"}
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert canonical_inputs({"t": dt.time(10, 5, tzinfo=plus_two)}) == {"t": "08:05:00Z"}
    assert fingerprint({"t": dt.time(10, 5, tzinfo=plus_two)}) == fingerprint({"t": dt.time(8, 5, tzinfo=dt.UTC)})


@pytest.mark.parametrize("when", [
    dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5))),
    dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
])
def test_an_aware_datetime_that_leaves_the_calendar_in_utc_is_bad_input_naming_it(when: dt.datetime) -> None:
    # An OverflowError out of fingerprint(), dispatch (internal.unexpected, exit 1) and the worker (no ledger row).
    with pytest.raises(InputInvalid) as err:
        fingerprint({"window": {"when": when}})
    assert err.value.field == 'inputs.window.when' and "out of range" in err.value.message, err.value


def test_the_credentials_inside_text_inputs_are_known_secret_values_for_messages() -> None:
    # A body that took the password out of a DSN input and raised with it alone: the message had no shape left to
    # know it by, and the password reached reason_message.
    found = secret_values({"note": "postgres://app:cnry%40Pw1@db/prod", "plain": "hello world",
                           "h": ["sent Bearer tok9876543210"], "u": "https://a/b?x=1&sig=Zz12%2Bq"})
    assert {"cnry%40Pw1", "cnry@Pw1", "tok9876543210", "Zz12%2Bq", "Zz12+q"} <= set(found), found
    assert not any("hello" in f or "postgres" in f for f in found), found
    assert sanitize_message("login refused, tried cnry@Pw1", extra_secrets=found) == "login refused, tried [redacted]"
    # The token alone, whatever stood between it and its word: "\ttok..." was the known secret, and a message quoting
    # the token alone kept it.
    tabbed = secret_values({"header": "Bearer\tcnryTab12345", "h2": "bearer   cnrySpaces678"})
    assert set(tabbed) == {"cnryTab12345", "cnrySpaces678"}, tabbed
    assert sanitize_message("refused cnryTab12345 and cnrySpaces678", extra_secrets=tabbed) == (
        "refused [redacted] and [redacted]")


def test_a_credential_in_a_mappings_key_is_redacted_like_one_in_a_value() -> None:
    # {"mirrors": {"https://deploy:<password>@git.example.com/r.git": {...}}}: the password was recorded in context
    # and fingerprinted (two passwords, two identities).
    def mirrors(password: str) -> dict[str, Any]:
        return {"mirrors": {f"https://deploy:{password}@git.example.com/r.git": {"branch": "main"}}}

    assert canonical_inputs(mirrors("cnryKeyA1")) == {
        "mirrors": {"https://deploy:[redacted]@git.example.com/r.git": {"branch": "main"}}}
    assert fingerprint(mirrors("cnryKeyA1")) == fingerprint(mirrors("cnryKeyB2"))
    assert "cnryKeyA1" in secret_values(mirrors("cnryKeyA1"))
    # Two keys that redaction makes one would lose one of them: refused, naming the mapping.
    with pytest.raises(InputInvalid) as err:
        canonical_inputs({"m": {"https://u:cnryA1@h": 1, "https://u:[redacted]@h": 2}})
    assert err.value.field == "inputs.m" and "cnry" not in err.value.message
