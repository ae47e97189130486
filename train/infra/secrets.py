"""Credentials inside URLs, redacted wherever a URL is shown: log lines, error messages, results and reports.

An endpoint's URL may carry its credentials: user info (`https://user:password@host/v1`) or a query value
(`https://host/v1?api-key=...`, a SAS `sig=...`). `redact_url` replaces them with `***` and leaves the rest (host,
path, other query values such as `api-version`) legible; `redact_text` does it for every URL in a message, and
`RedactingFilter` for every record of a logger (HTTP clients log each request's full URL at INFO).

    >>> redact_url("https://me:pw@example.com/v1?api-key=abc&api-version=1")
    'https://***@example.com/v1?api-key=***&api-version=1'
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are credentials: any key containing one of these words (case-insensitive).
SECRET_QUERY_WORDS = ("key", "token", "secret", "password", "passwd", "pwd", "auth", "sig", "credential", "session")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")


def _secret_key(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in SECRET_QUERY_WORDS)


def _redact_query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        key, equals, value = part.partition("=")
        parts.append(f"{key}={MASK}" if equals and value and _secret_key(key) else part)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """`url` with its user info and the values of secret-looking query keys (`api-key`, `token`, `sig`, ...)
    replaced by `***`. Anything that is not a URL with a scheme and a host is returned as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, query=_redact_query(parts.query)))


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted by `redact_url`."""
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the URLs of every record it sees (its formatted message; the arguments are
    folded in). Add it to a library's logger, e.g. an HTTP client's, which logs each request's full URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_logger(name: str) -> None:
    """Add one `RedactingFilter` to the logger `name` (again: nothing changes)."""
    logger = logging.getLogger(name)
    if not any(isinstance(existing, RedactingFilter) for existing in logger.filters):
        logger.addFilter(RedactingFilter())


__all__ = ["MASK", "RedactingFilter", "redact_logger", "redact_text", "redact_url"]
