"""The web client's page at / (webclient/): served by Django with a policy that lets in nothing but
the client's own files. What the client does is tested in a real browser (tests/browser/)."""
from __future__ import annotations

import pytest
from django.contrib.staticfiles import finders
from django.test import Client


@pytest.fixture
def page(db):
    return Client().get("/")


def test_the_page_is_served_at_the_root_and_never_cached(page):
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/html")
    assert "no-cache" in page["Cache-Control"] and "no-store" in page["Cache-Control"]
    assert '<script type="module" src="/static/webclient/main.js"></script>' in page.content.decode()


def test_the_policy_allows_only_the_own_origin_and_no_inline_code(page):
    policy = dict(
        (directive.split(" ", 1) + [""])[:2] for directive in page["Content-Security-Policy"].split("; ")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in page["Content-Security-Policy"]
    assert page["Referrer-Policy"] == "no-referrer"


def test_the_page_has_no_inline_script_or_style(page):
    html = page.content.decode()
    assert "<script>" not in html and "<style" not in html and " style=" not in html and " on" + "click=" not in html


def test_every_file_the_page_names_is_a_static_file_of_the_client(page):
    html = page.content.decode()
    for name in ("webclient/main.js", "webclient/app.css", "webclient/icon.svg"):
        assert f"/static/{name}" in html
        assert finders.find(name), name


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_other_methods_are_refused_not_failed(db, method):
    assert getattr(Client(), method)("/").status_code == 405
