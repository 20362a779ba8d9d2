"""Tests for aevyra_forge.core.redact: no credential survives in a URL, nothing else is
changed."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.redact import is_redacted, redact_url, redact_urls

SECRET = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=6,
                 max_size=30).filter(lambda s: s.strip() == s and "REDACTED" not in s)


@given(user=SECRET, password=SECRET, port=st.none() | st.integers(1, 65535))
def test_no_userinfo_survives(user: str, password: str, port: int | None) -> None:
    host = "llm.example.com" + (f":{port}" if port else "")
    url = f"https://{quote(user, safe='')}:{quote(password, safe='')}@{host}/v1"
    out = redact_url(url)
    assert out == f"https://REDACTED@{host}/v1"
    assert is_redacted(out)


def test_secret_query_values_go_and_the_rest_stays() -> None:
    assert redact_url("http://h:8000/v1?api_key=abc&model=x&sig=zz") == \
        "http://h:8000/v1?api_key=REDACTED&model=x&sig=REDACTED"
    for plain in ("http://127.0.0.1:8000/v1", "http://[::1]:81/x", "not a url",
                  "meta-llama/Llama-3.1-8B-Instruct", ""):
        assert redact_url(plain) == plain and not is_redacted(plain)
    assert redact_url("http://u:p@[::1]:81/") == "http://REDACTED@[::1]:81/"


def test_nested_settings_are_redacted() -> None:
    config = {"settings": {"llm_base_url": "http://me:pw@h/v1", "workers": [
        "ssh://root:hunter2@node1"], "concurrency": 8}}
    assert redact_urls(config) == {"settings": {"llm_base_url": "http://REDACTED@h/v1",
                                                "workers": ["ssh://REDACTED@node1"],
                                                "concurrency": 8}}
