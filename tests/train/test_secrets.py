"""`train.infra.secrets.redact_url`: credentials inside URLs (user info, secret-looking query values) never reach a
log line, a results file or a report."""

import logging

import pytest

from train.infra.secrets import RedactingFilter, redact_text, redact_url


@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ("https://user:pass@host:8443/v1", "https://***@host:8443/v1"),
    ("https://token-only@host/v1", "https://***@host/v1"),
    ("https://host/v1?api-key=abc&api-version=2024-10-21", "https://host/v1?api-key=***&api-version=2024-10-21"),
    ("http://u:p@127.0.0.1:9/v1?key=1&token=2&sig=3&Signature=4&access_token=5&x=6#frag",
     "http://***@127.0.0.1:9/v1?key=***&token=***&sig=***&Signature=***&access_token=***&x=6#frag"),
    ("https://host/v1?password", "https://host/v1?password"),  # a bare word carries no value
    ("not a url", "not a url"),
    ("", ""),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected
    assert redact_url(redact_url(url)) == expected  # idempotent


def test_redact_text_finds_every_url_in_a_message():
    text = 'HTTP Request: POST http://a:b@h/v1/chat/completions?api-key=s "HTTP/1.1 200 OK", then https://h2/?x=1'
    assert redact_text(text) == ('HTTP Request: POST http://***@h/v1/chat/completions?api-key=*** "HTTP/1.1 200 OK", '
                                 "then https://h2/?x=1")


def test_redacting_filter_rewrites_the_record_of_a_library_logger(caplog):
    logger = logging.getLogger("emovlm-test-library")
    redacting = RedactingFilter()
    logger.addFilter(redacting)
    try:
        with caplog.at_level(logging.INFO, logger="emovlm-test-library"):
            logger.info("HTTP Request: %s %s", "POST", "https://u:secret-pw@host/v1?api-key=secret-key")
    finally:
        logger.removeFilter(redacting)
    assert caplog.records[0].getMessage() == "HTTP Request: POST https://***@host/v1?api-key=***"
    assert "secret-pw" not in caplog.text and "secret-key" not in caplog.text
