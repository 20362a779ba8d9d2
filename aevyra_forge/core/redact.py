"""Credentials hidden before anything is written or printed: the user part of a URL
(`http://user:pass@host`) and secret-looking query parameters (`?api_key=...`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
# Query parameter names that carry a credential; matched case-insensitively as substrings.
_SECRET_PARAMS = ("key", "token", "secret", "password", "passwd", "sig", "auth")


def redact_url(url: str) -> str:
    """`url` with its user information and secret query values replaced by REDACTED; any
    other text is returned as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL after all
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(m in name.lower() for m in _SECRET_PARAMS) for name, _ in pairs]
    query = parts.query
    if any(secret):
        query = urlencode([(name, REDACTED if hide else value)
                           for (name, value), hide in zip(pairs, secret, strict=True)],
                          safe=REDACTED)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(value: Any) -> Any:
    """`value` (JSON-like: mappings, lists, strings) with every URL in it redacted."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_urls(item) for item in value]
    return value


def is_redacted(url: str | None) -> bool:
    """Whether `url` lost a credential to redact_url (so it cannot be used as it is)."""
    return bool(url) and REDACTED in str(url)
