"""Stable, secret-free input fingerprints and the run identity derived from them.

The canonical form is JSON with sorted keys and one spelling per value: ``1``, ``1.0`` and
``Decimal("1.00")`` are the same number; UUIDs are lowercase; datetimes are UTC; tuples, lists and
sets are arrays (sets sorted). Keys that name secrets, and ``SecretStr`` values, are dropped at any
depth, and credentials inside text (a URL's password, a bearer token, a JWT, a well-known token prefix,
``password=``/``token=``-style pairs) are redacted, so the fingerprint never depends on (and the ledger
``context`` never holds) a secret.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Mapping
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from pathlib import PurePath
from typing import Any

import pydantic.networks
import pydantic_core
from pydantic import BaseModel, SecretBytes, SecretStr

from opspolish.errors import InputInvalid, InputTooLarge
from opspolish.sanitize import credentials_in, might_hold_secrets, redact_credentials

FINGERPRINT_VERSION = 1
MAX_DEPTH = 32
MAX_CANONICAL_BYTES = 64 * 1024

#: The password family: password/passwd/passphrase anywhere (password2, password_confirmation, passwordhash); pass
#: and pwd as a word of the key (db_pass, pwd_hash), never inside another (passenger, passage); passcode where the
#: key's name ends (user_passcode); pin, otp and totp as the whole key (pin, pin_code, otp; never gpio_pin, pin_version,
#: otp_digits: settings such as those would be dropped and distinct requests merged). Under these keys even a number is
#: a secret (a numeric password, PIN or one-time code).
_PASSWORD_WORDS = (r"pass(word|wd|phrase)|(^|_)pass(_|$)|(^|_)pwd|(^|_)passcode$|^(pin|otp|totp)(_?code)?$|"
                   # a card's security code and the one-time or recovery codes of a login, where the key ends
                   r"(^|_)(cvv|cvc|cvv2|security_code|(mfa|2fa|verification|recovery|backup)_codes?)$")
_PASSWORD_KEY = re.compile(_PASSWORD_WORDS)
_SECRET_KEY = re.compile(
    # auth as a word of the key (auth_key), never inside another (author)
    _PASSWORD_WORDS + r"|api_?key|authorization|(^|_)auth(_|$)|auth_?key|"
    r"private_?key|access_?key|secret_?key|"
    # a key named for what it signs or encrypts with (signing_key, encryption_key, ssh_key, privkey, hmac_key,
    # master_key, license_key): where the key's name ends, so that signing_key_id stays an identifier (and a word of
    # its own: design_key is none)
    r"(^|_)(ssh|signing|sign|encryption|encrypt|crypt|master|hmac|priv|license|licence|aes|gpg|pgp)_?keys?$|"
    # an otpauth:// URI carries the TOTP seed itself
    r"(^|_)otpauth(_?ur[il])?$|"
    # a bearer credential or a JWT named as such (jwt, id_jwt, bearer; never jwt_issuer)
    r"(^|_)(jwt|bearer)s?$|"
    # secret, token, credential, cookie, signature, session id: where a word of the key ends (client_secret,
    # accesstoken, refreshTokens, token_id), never inside a longer word: a tokenizer or a secretary is no secret,
    # and left out of the identity, tokenizer="bert" and tokenizer="gpt2" were one run
    r"(secret|token|credential|cookie|signature|session_?id)s?(_|$)",
)
#: camelCase word boundaries, so that refreshToken reads as refresh_token and tokenCount as token_count.
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@functools.lru_cache(maxsize=4096)
def key_segment(key: str) -> str:
    """How a mapping key extends a field path in error messages: ``.key``, or ``["key"]`` for a key that is not a
    plain name or that could read as the name of a secret (``password``, ``max_tokens``, ``passenger``). Every
    message is sanitized on its way out, and ``inputs.max_tokens: Input should be...`` would come out as
    ``inputs.max_tokens: [redacted] should be...``: the sanitizer cannot tell a field path from ``token: value``."""
    if _PLAIN_KEY.fullmatch(key) and not might_hold_secrets(key):
        return f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """True when a mapping key names a secret (``password``, ``client_secret``, ``X-Api-Key``...)."""
    return bool(_SECRET_KEY.search(_words(key)))


def _words(key: str) -> str:
    """``key`` lower-cased with its words joined by ``_``: ``X-Api-Key`` -> ``x_api_key``, ``refreshToken`` ->
    ``refresh_token``."""
    return _CAMEL.sub("_", key).lower().replace("-", "_")


def is_secret_item(key: str, item: Any) -> bool:
    """True when ``item``, under ``key``, is a secret: any value under a password-family key, and text (or a
    structure) under the other secret-named keys. A number or a flag under ``token``, ``secret``, ``cookie``,
    ``signature``... names a setting (``max_tokens``, ``token_count``, ``cookie_consent``), not a credential: left
    out, it made ``max_tokens=10`` and ``max_tokens=4000`` one identity, and the second request joined the first."""
    if not is_secret_key(key):
        return False
    if isinstance(item, bool | int | float | Decimal):
        return bool(_PASSWORD_KEY.search(_words(key)))
    return True


#: The most digits an integer in the inputs may have: Python's own bound for turning one into text (and so into
#: JSON). Past it, Decimal("1e1000000") took 25 s of CPU to become an int, and 10**5000 failed as a bare ValueError.
MAX_DIGITS = 4300
_TOO_MANY_DIGITS = 10**MAX_DIGITS


def _too_many_digits(path: str) -> InputInvalid:
    return InputInvalid(f"{path}: number has more than {MAX_DIGITS} digits", field=path)


def _number(value: Decimal, path: str, budget: _Budget) -> Decimal | int:
    if not value.is_finite():
        raise InputInvalid(f"{path}: non-finite number is not allowed", field=path)
    if value.adjusted() >= MAX_DIGITS:  # an integer part of more than MAX_DIGITS digits
        raise _too_many_digits(path)
    digits = value.as_tuple().digits
    # Spent as written out, not as its digits alone: 1E+4299 is 4,300 characters, and 60,000 of them in a list took
    # 45 s and 600 MB before the size cap refused them.
    if value == value.to_integral_value():
        budget.spend(max(len(digits), value.adjusted() + 1) // 2)
        return int(value)
    # Trailing zeros stripped exactly: normalize() in the default context rounded to 28 digits (two numbers that
    # differ in the 29th were one identity, the second dispatch joining the first's run) and flushed tiny ones to 0.
    exact = value.normalize(Context(prec=len(digits), Emin=MIN_EMIN, Emax=MAX_EMAX))
    places = -int(exact.as_tuple().exponent)
    if places > MAX_DIGITS:  # PostgreSQL's numeric holds 16,383 at most; 4,300 as for an integer part
        raise InputInvalid(f"{path}: number has more than {MAX_DIGITS} digits after the point", field=path)
    budget.spend(max(len(digits), places + max(value.adjusted() + 1, 1)) // 2)
    budget.decimals = True
    return exact


def exact_float(text: str) -> float | Decimal:
    """``parse_float`` for JSON this library reads back (the ledger's jsonb, the CLI's inputs): the float when it is
    exactly that number (``0.1``, ``2.5e-07``: every float's canonical text), else the exact Decimal
    (``0.10000000000000000001``, ``123456789012345678.5``), which a float would have rounded: the context read back
    for a re-enqueued run's body, and two inputs the CLI was given, were other numbers than the ones dispatched."""
    number = Decimal(text)
    as_float = float(number)
    return as_float if math.isfinite(as_float) and Decimal(repr(as_float)) == number else number


def json_text(value: Any) -> str:
    """JSON text of a value that may hold Decimals (written as exact numbers); json.dumps for anything else."""
    try:
        return json.dumps(value)
    except TypeError:  # a Decimal somewhere (a value of another type raises TypeError from _dumps too)
        return _dumps(value)


def load_json(text: str | bytes) -> Any:
    """json.loads with :func:`exact_float`: what :func:`json_text` wrote reads back as the same numbers."""
    return json.loads(text, parse_float=exact_float)


def _check_secret(value: Any, path: str, depth: int, budget: _Budget) -> None:
    """A value left out as a secret is still queued, and arq's start line prints the job's arguments: an integer past
    MAX_DIGITS cannot be printed, and the worker dropped the job before opspolish saw it (the run stayed queued). The
    secrets' text is held to the same 64 KiB as the rest (a 50 MB password was queued and run). Each container once
    (a secret value may contain itself), no deeper than the inputs may nest."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= _TOO_MANY_DIGITS or -value >= _TOO_MANY_DIGITS:
            raise _too_many_digits(path)
        return
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, str | bytes | bytearray):
        budget.secret_left -= len(value)
        if budget.secret_left < 0:
            raise InputTooLarge(f"inputs: secret values larger than {MAX_CANONICAL_BYTES} bytes in all", field="inputs")
        return
    if depth > MAX_DEPTH or not isinstance(value, Mapping | list | tuple | set | frozenset) or id(value) in budget.seen:
        return
    budget.seen.add(id(value))
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_secret(key, f"{path}[]", depth + 1, budget)
            _check_secret(item, path + (key_segment(key) if isinstance(key, str) else "[]"), depth + 1, budget)
    else:
        for i, item in enumerate(value):
            _check_secret(item, f"{path}[{i}]", depth + 1, budget)


class _Budget:
    """Bytes the canonical text may still take. Every value spends no more than it will take there (a string
    its characters, any value at least one), so a payload far over the cap is refused after reading about
    64 KiB of it, not all of it; one under the cap never runs out."""

    __slots__ = ("decimals", "left", "secret_left", "seen")

    def __init__(self) -> None:
        self.left = MAX_CANONICAL_BYTES
        self.decimals = False  # a Decimal in the tree: json.dumps cannot spell it, _dumps must
        self.secret_left = MAX_CANONICAL_BYTES  # what the values left out as secrets may take (_check_secret)
        self.seen: set[int] = set()  # the secret containers _check_secret has walked

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise InputTooLarge(f"inputs: larger than {MAX_CANONICAL_BYTES} bytes once canonical", field="inputs")


#: Values a model's output holds that are text in JSON: written as pydantic writes them in JSON (``PT1H`` for an hour,
#: ``10:05:00Z``, ``https://example.com/``), which the model reads back. They were refused as "unsupported type": a
#: model with an ``HttpUrl``, ``IPvAnyAddress``, ``timedelta`` or ``time`` field could not be dispatched (paths, the
#: same, are written by str() below).
_AS_JSON_TEXT: tuple[type, ...] = tuple(t for t in (
    dt.time, dt.timedelta, ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
    ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface, pydantic.AnyUrl,
    getattr(pydantic.networks, "_BaseMultiHostUrl", None),  # PostgresDsn, RedisDsn... (pydantic >= 2.10)
    pydantic_core.Url, pydantic_core.MultiHostUrl,
) if isinstance(t, type))


def _canonical(value: Any, path: str, depth: int, budget: _Budget) -> Any:  # noqa: C901 - a branch per type
    if depth > MAX_DEPTH:
        raise InputInvalid(f"{path}: nested deeper than {MAX_DEPTH} levels", field=path)
    budget.spend(1)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, path, depth, budget)
    if isinstance(value, int):
        if value >= _TOO_MANY_DIGITS or -value >= _TOO_MANY_DIGITS:
            raise _too_many_digits(path)
        budget.spend(value.bit_length() // 4)  # fewer than its digits: never more than it takes once canonical
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputInvalid(f"{path}: non-finite number is not allowed", field=path)
        return _number(Decimal(repr(value)), path, budget)
    if isinstance(value, Decimal):
        return _number(value, path, budget)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputInvalid(f"{path}: text is not valid UTF-8", field=path) from None
        if "\x00" in value:  # PostgreSQL's text and jsonb cannot hold it: input.invalid, not a driver error. Here,
            # every text of the canonical tree (an enum's value, a model's or a path's text too) is checked.
            raise InputInvalid(f"{path}: text contains a NUL character", field=path)
        text = redact_credentials(value)
        budget.spend(len(text) + 1)  # its characters and quotes (the 1 spent above is the other quote)
        return text
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InputInvalid(f"{path}: naive datetime (give it a timezone)", field=path)
        try:
            return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        except OverflowError:  # 0001-01-01T00:00+05:00 is in year 0 in UTC: it raised out of dispatch and the worker
            raise InputInvalid(f"{path}: datetime out of range once in UTC (years 1-9999)", field=path) from None
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="python"), path, depth, budget)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputInvalid(f"{path}: keys must be strings, got {type(key).__name__}", field=path)
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise InputInvalid(f"{path}: key {key!r} is not valid UTF-8", field=path) from None
            if is_secret_item(key, item) or isinstance(item, SecretStr | SecretBytes):
                _check_secret(item, path + key_segment(key), depth + 1, budget)
                continue
            if "\x00" in key:
                raise InputInvalid(f"{path + key_segment(key)}: text contains a NUL character",
                                   field=path + key_segment(key))
            # A key holds credentials like a value may (a mirror's URL with its password as a mapping's key): they
            # were recorded in context and fingerprinted.
            safe = redact_credentials(key)
            if safe in out:  # only redaction can make two keys of a mapping one
                raise InputInvalid(f"{path}: two keys are the same once their credentials are redacted ({safe!r})",
                                   field=path)
            budget.spend(len(safe) + 3)  # "key":
            out[safe] = _canonical(item, path + key_segment(key), depth + 1, budget)
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple):
        items = []
        for i, item in enumerate(value):
            if isinstance(item, SecretStr | SecretBytes):  # left out, but queued: held to the secrets' budget
                _check_secret(item, f"{path}[{i}]", depth + 1, budget)
            else:
                items.append(_canonical(item, f"{path}[{i}]", depth + 1, budget))
        return items
    if isinstance(value, set | frozenset):
        items = [_canonical(item, f"{path}[]", depth + 1, budget) for item in value]
        return sorted(items, key=_dumps)
    if isinstance(value, PurePath):  # str(): pydantic's JSON cannot write a pure path
        return _canonical(str(value), path, depth, budget)
    if isinstance(value, dt.time) and value.utcoffset() is not None:
        # As aware datetimes are, in UTC: 10:05+02:00 and 08:05Z are equal times, and were two identities.
        value = dt.datetime.combine(dt.date(2000, 1, 1), value).astimezone(dt.UTC).timetz()
    if isinstance(value, _AS_JSON_TEXT):
        return _canonical(pydantic_core.to_jsonable_python(value), path, depth, budget)
    if isinstance(value, SecretStr | SecretBytes):
        raise InputInvalid(f"{path}: a secret cannot be the whole input", field=path)
    kind = "bytes are not allowed (decode them)" if isinstance(value, bytes | bytearray) else (
        f"unsupported type {type(value).__name__}"
    )
    raise InputInvalid(f"{path}: {kind}", field=path)


def _dumps(value: Any) -> str:
    """Canonical JSON text: sorted keys, no spaces, numbers as exact decimal text."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value, ensure_ascii=False)


def canonical_json(inputs: Mapping[str, Any] | None) -> str:
    """The canonical JSON text of the non-secret inputs; refuses payloads over 64 KiB."""
    if inputs is None:
        return "{}"
    if not isinstance(inputs, Mapping):
        raise InputInvalid(f"inputs: must be a mapping, got {type(inputs).__name__}", field="inputs")
    budget = _Budget()
    tree = _canonical(inputs, "inputs", 0, budget)
    # Keys are sorted and every number is an int already, unless a Decimal is left: then the slow spelling.
    text = _dumps(tree) if budget.decimals else json.dumps(tree, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_CANONICAL_BYTES:
        raise InputTooLarge(f"inputs: larger than {MAX_CANONICAL_BYTES} bytes once canonical", field="inputs")
    return text


def canonical_inputs(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The non-secret inputs as plain JSON values (what the ledger stores as ``context``)."""
    value = load_json(canonical_json(inputs))
    assert isinstance(value, dict)
    return value


def context_and_fingerprint(inputs: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """``(canonical_inputs(inputs), fingerprint(inputs))`` from one canonicalization."""
    return context_and_fingerprint_of(canonical_json(inputs))


def context_and_fingerprint_of(text: str) -> tuple[dict[str, Any], str]:
    """The context and the fingerprint of a :func:`canonical_json` text."""
    context = load_json(text)  # exact: a float would round what the canonical text spells in full
    assert isinstance(context, dict)
    return context, fingerprint_of(text)


def fingerprint_of(text: str) -> str:
    """The fingerprint of a :func:`canonical_json` text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(inputs: Mapping[str, Any] | None, *, job_type: str | None = None) -> str:
    """sha256 hex of the canonical non-secret inputs. Deterministic across processes and hash seeds.

    With ``job_type``, the inputs are validated by that job type's inputs model first, as dispatch does (a model
    may normalise them: an upper-case UUID comes out lower-case), so this is the fingerprint a dispatch of that
    type would record; :class:`InputInvalid` names a bad field. A type not registered yet is looked for in the
    modules of ``OPSPOLISH_JOB_MODULES``, as dispatch does. Without ``job_type``, the inputs are hashed as given.
    """
    if job_type is not None:
        from opspolish.tracking import REGISTRY, get_job  # tracking imports this module

        modules = ""
        if job_type not in REGISTRY:  # read only when needed: the settings may not be this caller's business
            from opspolish.settings import Settings

            modules = Settings().job_modules
        return fingerprint_of(get_job(job_type, modules).canonical(inputs)[1])
    return fingerprint_of(canonical_json(inputs))


def identity_hash(scope: str, run_type: str, fingerprint_hex: str) -> str:
    """sha256 hex of the run identity. ``scope`` is ``tenant:<uuid>`` or ``workspace:<uuid>``.

    The same text is built in SQL by ``opspolish_identity()``; a test holds the two equal.
    """
    text = f"opspolish.identity/v{FINGERPRINT_VERSION}\n{scope}\n{run_type}\n{fingerprint_hex}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lock_key(identity_hex: str) -> int:
    """The signed 64-bit advisory-lock key of an identity: its first 8 bytes, big-endian.

    Never Python's ``hash()``, which is salted per process. SQL: ``opspolish_lock_key()``.
    """
    return int.from_bytes(bytes.fromhex(identity_hex[:16]), "big", signed=True)


#: Shorter secret values are not redacted by value (they would mangle every message they occur in).
MIN_SECRET_CHARS = 4


def _credentials_of(texts: list[str]) -> list[str]:
    """The credentials inside ``texts``, after one look over them all: one by one, 1,500 policy ids took 2.5 ms of a
    run instead of 0.8."""
    if not texts or not might_hold_secrets("\n".join(texts)):
        return []
    return [part for text in texts for part in credentials_in(text) if len(part) >= MIN_SECRET_CHARS]


def secret_values(inputs: Any) -> tuple[str, ...]:
    """The literal secrets inside inputs - ``SecretStr`` values, whatever sits under a secret-named key, and the
    credentials inside text values (a DSN's password), at any depth - so messages that echo them (a provider's error
    text, say) can be redacted."""
    found: list[str] = []
    texts: list[str] = []  # non-secret texts and keys, searched for credentials at the end

    def walk(value: Any, secret: bool, depth: int = 0) -> None:
        # Nothing deeper than MAX_DEPTH is collected: a value under a secret key is never canonicalized, so it may
        # contain itself, and walking it raised RecursionError after the claim (the run stayed running).
        if depth > MAX_DEPTH:
            return
        if isinstance(value, SecretStr | SecretBytes):
            raw = value.get_secret_value()
            walk(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw, True, depth + 1)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not secret:
                    texts.append(key)
                walk(item, secret or (isinstance(key, str) and is_secret_item(key, item)), depth + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item, secret, depth + 1)
        elif secret and value is not None and not isinstance(value, bool):
            text = str(value)
            if len(text) >= MIN_SECRET_CHARS:
                found.append(text)
        elif isinstance(value, str):  # the credentials inside a text (a DSN's password, a token after Bearer)
            texts.append(value)

    walk(inputs, False)
    found += _credentials_of(texts)
    return tuple(dict.fromkeys(found))
