"""Turn any error text into a one-line, bounded message with no secrets and no stack trace."""

from __future__ import annotations

import re
from urllib.parse import unquote

MAX_MESSAGE_CHARS = 500
REDACTED = "[redacted]"

_SECRET_WORDS = (
    r"pass(?:word|wd)?|pwd|secret|client[_-]?secret|token|access[_-]?token|refresh[_-]?token|api[_-]?key|"
    # sig where it ends a word (sig, sigs, url_sig): inside one (design, a database named ..._sigconv) it took the value
    # after any "design:" or job id's "..._sigconv:" for a secret
    r"apikey|access[_-]?key|auth(?:orization)?|credentials?|private[_-]?key|cookie|session[_-]?id|signature|"
    r"sigs?(?![a-z])"
)
#: A PEM private key block, BEGIN line to END line (or to the end of a text cut short), whatever key word or line
#: breaks come before it: the key=value rule took only "-----BEGIN" and left the key's body in the message. Runs
#: first, so that rule does not split the block. Linear: a possessive run that stops at the END marker.
_PEM_PRIVATE_KEY = (
    re.compile(r"-----BEGIN ([A-Z0-9 ]{0,40}?)PRIVATE KEY-----(?:(?!-----END )[\s\S])*+"
               r"(?:-----END [A-Z0-9 ]{0,40}?PRIVATE KEY-----)?"),
    rf"-----BEGIN \1PRIVATE KEY-----{REDACTED}-----END \1PRIVATE KEY-----",
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    _PEM_PRIVATE_KEY,
    # scheme://user:password@host  ->  scheme://user:[redacted]@host. Every pattern here starts only where a token
    # starts and takes its runs possessively (*+, ++): with \b and backtracking runs, a few KB of repeated words
    # ("password-password-...") took seconds to minutes (cubic in the length), in the CLI and in the worker. The
    # password runs to the last @ before the host, as a URL parser reads it: stopping at its first @ left the tail of
    # p@ssword in the text. That one run backtracks, over at most the text up to the next / or space.
    (re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*+://[^\s:/@]*+):([^\s/]*)@"), rf"\1:{REDACTED}@"),
    # Authorization: Bearer xxx / Basic xxx. The credential is never one of these words itself: in "Basic Bearer xxx"
    # the match is "Bearer xxx", where taking "Bearer" as Basic's credential left xxx in the text.
    (re.compile(r"(?i)\b(bearer|basic|token)\s+(?!(?:bearer|basic|token)\b)[A-Za-z0-9\-._~+/=]{6,}"),
     rf"\1 {REDACTED}"),
    # JWTs anywhere
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"), REDACTED),
    # key=value, key: value, "key": "value" for secret-named keys (a value already redacted is left alone, so
    # sanitizing a sanitized message changes nothing; so is a scheme word before one, as the rule above leaves an
    # Authorization header: its Bearer was taken for the value, "Authorization: [redacted] [redacted]")
    (
        re.compile(
            rf"(?i)([\"']?(?<![\w\-])(?=[\w\-]*?(?:{_SECRET_WORDS}))[\w\-]++[\"']?\s*+[:=]\s*+)"
            + r"(?![\"']?(?:(?:bearer|basic|token)\s++)?+" + re.escape(REDACTED) + r"(?:[\"'\s,;&}\]]|$))"
            # A value that opens a mapping ({'api_key': ...}) is not taken: its first key was, and the nested secret
            # after it stayed. A brace that opens no mapping ({x) is a value like any other.
            # A quoted value to its closing quote, past escaped ones (repr's 'it\'s "x"'): stopping at the first
            # quote left the rest of the secret in the text.
            + r"(\"(?:[^\"\\]|\\.)*+\"|'(?:[^'\\]|\\.)*+'|(?:\{(?![\s\"'])|[^\s,;&}\]{])[^\s,;&}\]]*)"
        ),
        rf"\1{REDACTED}",
    ),
    # long opaque credentials with well-known prefixes (GitHub, Slack, AWS, Stripe...)
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,}|xox[abpr]-[A-Za-z0-9\-]{10,}|"
                r"AKIA[0-9A-Z]{16}|sk_(?:live|test)_[A-Za-z0-9]{10,})\b"), REDACTED),
)
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)

#: The shapes that are credentials wherever they stand, with no surrounding word to guess from: what input
#: canonicalization redacts inside text values. The word-based rules above (``basic xxx``, ``sig: xxx``) would
#: also take ordinary words there ("Basic Compliance", "design: v2") and make distinct inputs one identity.
_CREDENTIAL_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    _PEM_PRIVATE_KEY,
    _PATTERNS[1],  # scheme://user:password@host
    # A bearer token: with a digit in it (8 characters or more) or of 20 or more, so that "Flag bearer training" and
    # "Flag bearer marching" stay two inputs (any 6 characters after the word were taken, and the two were one).
    (re.compile(r"(?i)\b(bearer)\s+(?!bearer\b)(?=[A-Za-z\-._~+/=]*+[0-9]|[A-Za-z0-9\-._~+/=]{20})"
                r"[A-Za-z0-9\-._~+/=]{8,}"), rf"\1 {REDACTED}"),
    _PATTERNS[3],  # JWTs
    _PATTERNS[5],  # well-known token prefixes
    # An HTTP Authorization header's credential, whatever its scheme (the word "Basic" alone is ordinary text), and
    # the API-key headers' (X-Api-Key, Api-Key, X-Auth-Token, X-Access-Token). The scheme is taken whole or not at all
    # (?+): "Authorization: Bearer [redacted]" came out "[redacted] [redacted]", the word Bearer taken for the token.
    (re.compile(r"(?i)\b((?:authorization|(?:x-)?api-key|x-auth-token|x-access-token)\s*+:\s*+"
                r"(?:(?:basic|bearer|digest|token)\s++)?+)"
                + r"(?!" + re.escape(REDACTED) + r")[A-Za-z0-9\-._~+/=]{6,}+"), rf"\1{REDACTED}"),
    # key=value (a query string, a connection string, an environment line) whose key ends in an unmistakable secret
    # word: password/passwd after anything (PGPASSWORD=), the shorter words after a separator (bypass= is no secret)
    (re.compile(r"(?i)((?<![\w\-])(?:[\w\-]*?pass(?:word|wd)|(?:[\w\-]*[_\-])?(?:pass(?:word|wd)?|pwd|secret|token|"
                r"api[_\-]?key|apikey|access[_\-]?key))\s*+=\s*+)"
                # a quoted value whole, as libpq's connection strings quote one (password='a b'): the bare-run rule
                # stopped at the quote and kept it. Unclosed, to the end of the text.
                + r"(?!" + re.escape(REDACTED) + r")('[^']*+'?|\"[^\"]*+\"?|[^\s,;&\]}\"']+)"), rf"\1{REDACTED}"),
    # A signed URL's signature, as a query parameter only (Azure SAS ``sig=``, S3 ``X-Amz-Signature=``, GCS
    # ``X-Goog-Signature=``, CloudFront ``Signature=``): it grants what the URL points at. Elsewhere "signature=" and
    # "sig:" are ordinary words of a text (a design, a sign-off), left alone.
    (re.compile(r"(?i)([?&](?:[\w\-]*[_\-])?(?:sig|signature)=)(?!" + re.escape(REDACTED) + r")([^\s&#\"'<>]+)"),
     rf"\1{REDACTED}"),
)


#: Substrings (of the lower-cased text) that every pattern above needs to match first: one of them is in
#: every secret word, scheme, token prefix or JWT header. Most log lines have none, and one scan for these
#: literals costs a microsecond where a case-insensitive alternation of the patterns costs fifteen.
_HINTS = ("pass", "pwd", "secret", "token", "api", "auth", "credential", "private", "cookie", "session", "sig",
          "access", "bearer", "basic", "eyj", "://", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox",
          "akia", "sk_")
_HINT = re.compile("|".join(re.escape(hint) for hint in _HINTS))
#: Letters that case-insensitive matching takes for ASCII ones but lower() keeps apart (dotless i, long s).
_FOLD = str.maketrans({"\u0131": "i", "\u017f": "s"})


def might_hold_secrets(text: str) -> bool:
    """False only when no pattern of :func:`redact_secrets` can match ``text``."""
    lowered = text.lower()
    if "\u0131" in lowered or "\u017f" in lowered:
        lowered = lowered.translate(_FOLD)
    return _HINT.search(lowered) is not None


#: A secret-named key whose value opens a container: ``'credentials': {'user': 'a', 'key': 'x'}``,
#: ``password=['a', 'b']``, ``"auth": {...}``. The key=value rule takes one token, so it passed over the mapping (its
#: inner keys name no secret) and stopped a list at its first comma: arq's start line printed such inputs whole.
_SECRET_CONTAINER = re.compile(
    rf"(?i)[\"']?(?<![\w\-])(?=[\w\-]*?(?:{_SECRET_WORDS}))[\w\-]++[\"']?\s*+[:=]\s*+(?=[\[{{(])"
)
_OPENERS, _CLOSERS = "[{(", "]})"


def _container_end(text: str, start: int) -> int:
    """Where the container opening at ``start`` ends: after its matching bracket (quoted text skipped), or the end of
    a text cut short."""
    depth, quote, i, n = 0, "", start, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _redact_containers(text: str) -> str:
    parts, done = [], 0
    for match in _SECRET_CONTAINER.finditer(text):
        if match.start() < done:  # inside a container already redacted
            continue
        parts += [text[done:match.end()], REDACTED]
        done = _container_end(text, match.end())
    return "".join(parts) + text[done:] if parts else text


def redact_secrets(text: str, *, extra_secrets: tuple[str, ...] = ()) -> str:
    """``text`` with credentials replaced by ``[redacted]``, otherwise unchanged (lines and length kept)."""
    for secret in extra_secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    if not might_hold_secrets(text):
        return text
    text = _redact_containers(text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_credentials(text: str) -> str:
    """``text`` with credential-shaped parts (a URL's password, a bearer token, a JWT, a GitHub/Slack/AWS/Stripe
    token, ``password=``/``token=``/``api_key=``-style pairs) replaced by ``[redacted]``; text with none comes back
    unchanged."""
    if not might_hold_secrets(text):
        return text
    for pattern, replacement in _CREDENTIAL_SHAPES:
        text = pattern.sub(replacement, text)
    return text


def credentials_in(text: str) -> list[str]:
    """The parts of ``text`` that :func:`redact_credentials` replaces (a URL's password, a token...), URL-decoded too:
    literal secrets to redact by value wherever they turn up alone (a body that takes the password out of a DSN input
    and raises with it: the message had no shape left to know it by)."""
    if not might_hold_secrets(text):
        return []
    found: list[str] = []
    for pattern, replacement in _CREDENTIAL_SHAPES:
        for match in pattern.finditer(text):
            whole, kept = match.group(0), match.expand(replacement)
            start = 0
            while start < min(len(whole), len(kept)) and whole[start] == kept[start]:
                start += 1
            end = 0
            while end < min(len(whole), len(kept)) - start and whole[-1 - end] == kept[-1 - end]:
                end += 1
            # stripped: the bearer rule keeps one space for all that stood between the word and the token ("Bearer\t
            # x" gave "\tx", which a message quoting x alone did not hold)
            secret = whole[start:len(whole) - end].strip()
            if secret and secret != REDACTED:
                found += [secret, unquote(secret)]
    return list(dict.fromkeys(found))


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` for an exception, even one whose ``str()`` itself raises or is empty (then ``Type``)."""
    try:
        text = str(exc)
    except Exception as inner:  # a broken __str__ must not take the outcome it describes down with it
        text = f"(its message could not be read: {type(inner).__name__})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def sanitize_message(text: object, *, extra_secrets: tuple[str, ...] = ()) -> str:
    """Return ``text`` as one line of at most 500 characters with credentials and stack traces removed.

    ``extra_secrets`` are literal values known to be secret (e.g. the configured DSN passwords).
    """
    s = str(text)
    if "Traceback" in s:
        s = _TRACEBACK.sub("", s)
    s = redact_secrets(s, extra_secrets=extra_secrets)
    s = " ".join(s.split())  # one line, no control characters
    if not s.isprintable():
        s = "".join(ch if ch.isprintable() else "?" for ch in s)
    if len(s) > MAX_MESSAGE_CHARS:
        s = s[: MAX_MESSAGE_CHARS - 1] + "…"
    return s
