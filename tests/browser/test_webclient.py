"""The web client in real headless Chromium against a live daphne (issue 19): two people converse,
one loses the network while the other writes and edits, and comes back to every message once, in
order; a removed participant's view drops the conversation; history pages upward on a phone-sized
screen; every request stays on the server's own origin (the page's headers: tests/test_webclient_page.py)."""
from __future__ import annotations

import sqlite3
import time

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser.harness import requests_made

pytestmark = pytest.mark.live_server_process

PASSWORD = "long-enough-pass-42"


def wait_for(browser, condition, what: str, timeout: float = 15):
    """Wait until condition(driver) is truthy; the failure names what was awaited."""
    return WebDriverWait(
        browser.driver, timeout, poll_frequency=0.1, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    ).until(condition, message=f"{browser.name}: {what}")


def js(browser, script: str, *args):
    return browser.driver.execute_script(script, *args)


def signup(browser, username: str) -> None:
    driver = browser.driver
    wait_for(browser, lambda d: d.find_element(By.ID, "auth-view").is_displayed(), "the log-in form")
    driver.find_element(By.ID, "auth-switch").click()
    driver.find_element(By.ID, "auth-username").send_keys(username)
    driver.find_element(By.ID, "auth-password").send_keys(PASSWORD, Keys.ENTER)
    wait_for(browser, lambda d: d.find_element(By.ID, "me-name").text == username, "signed in")


def start_conversation(browser, names: list[str], title: str = "") -> None:
    driver = browser.driver
    driver.find_element(By.CSS_SELECTOR, "#new-details summary").click()
    Select(driver.find_element(By.ID, "new-kind")).select_by_value("group" if title else "direct")
    if title:
        driver.find_element(By.ID, "new-title").send_keys(title)
    driver.find_element(By.ID, "new-people").send_keys(", ".join(names), Keys.ENTER)
    expected = title or names[0]
    wait_for(browser, lambda d: d.find_element(By.ID, "conversation-title").text == expected, f"conversation {expected} open")


def list_entries(browser) -> dict[str, int]:
    """The conversation list: name -> unread count."""
    return js(browser, """
        const out = {};
        for (const a of document.querySelectorAll('#conversation-list a')) {
          const badge = a.querySelector('.unread');
          out[a.querySelector('.name').textContent] = badge.hidden ? 0 : Number(badge.textContent);
        }
        return out;""")


def open_conversation(browser, name: str) -> None:
    def click_it(driver):
        for link in driver.find_elements(By.CSS_SELECTOR, "#conversation-list a"):
            if link.find_element(By.CLASS_NAME, "name").text == name:
                link.click()
                return True
        return False

    wait_for(browser, click_it, f"{name} in the list, clicked")
    wait_for(browser, lambda d: d.find_element(By.ID, "conversation-title").text == name, f"{name} open")


def send(browser, text: str) -> None:
    box = browser.driver.find_element(By.ID, "composer-input")
    box.send_keys(text, Keys.ENTER)


def timeline(browser) -> list[tuple[int, str]]:
    """(seq, text) of every message shown, top to bottom."""
    return [
        (seq, text)
        for seq, text in js(browser, """
            return [...document.querySelectorAll('#messages > li')].map(li =>
              [Number(li.dataset.seq), (li.querySelector('.body') || {}).textContent || '']);""")
    ]


def pending(browser) -> list[tuple[str, str]]:
    return [
        tuple(row)
        for row in js(browser, """
            return [...document.querySelectorAll('#pending > li')].map(li =>
              [li.querySelector('.body').textContent, li.querySelector('.status').textContent]);""")
    ]


def shows_texts(browser, texts: list[str]):
    return lambda d: [text for _, text in timeline(browser)][-len(texts):] == texts


def assert_in_order_once(browser) -> list[tuple[int, str]]:
    shown = timeline(browser)
    seqs = [seq for seq, _ in shown]
    assert seqs == sorted(set(seqs)), f"{browser.name} shows {seqs}: a duplicate or out of order"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{browser.name} shows {seqs}: a gap"
    return shown


def banner_shown(browser) -> bool:
    return browser.driver.find_element(By.ID, "offline-banner").is_displayed()


def test_two_people_converse_and_one_comes_back_from_offline_to_every_message_once_in_order(browsers, live):
    alice, bob = browsers("alice"), browsers("bob")
    signup(alice, "alice")
    signup(bob, "bob")
    browsers.step("signed-up")

    start_conversation(alice, ["bob"])
    # Bob's list gains the conversation over his one user stream, without a reload.
    wait_for(bob, lambda d: "alice" in list_entries(bob), "the new conversation in bob's list")
    send(alice, "hello bob")
    wait_for(alice, shows_texts(alice, ["hello bob"]), "alice's own message")
    wait_for(bob, lambda d: list_entries(bob).get("alice") == 1, "one unread for bob")
    browsers.step("first-message")

    open_conversation(bob, "alice")
    wait_for(bob, shows_texts(bob, ["hello bob"]), "bob reads alice's message")
    wait_for(bob, lambda d: list_entries(bob).get("alice") == 0, "bob's unread count cleared")
    # Bob's read marker reaches alice: her message says it was read.
    wait_for(alice, lambda d: d.find_element(By.CSS_SELECTOR, "#messages li.mine .read-mark").text == "Read", "read mark")
    bob.driver.find_element(By.ID, "composer-input").send_keys("typing a reply")
    wait_for(alice, lambda d: d.find_element(By.ID, "typing").text == "bob is typing…", "bob typing")
    bob.driver.find_element(By.ID, "composer-input").send_keys(Keys.ENTER)
    wait_for(alice, shows_texts(alice, ["hello bob", "typing a reply"]), "bob's reply at alice")
    wait_for(alice, lambda d: d.find_element(By.ID, "typing").text == "", "typing cleared by the message")
    browsers.step("conversing")

    # Bob's network goes away.
    bob.proxy.cut()
    wait_for(bob, lambda d: banner_shown(bob), "bob's offline banner")
    send(bob, "written offline")
    wait_for(bob, lambda d: pending(bob) == [("written offline", "Sending…")], "bob's send pending")
    sent_while_away = [f"while you were away {i}" for i in range(1, 6)]
    for text in sent_while_away:
        send(alice, text)
    wait_for(alice, shows_texts(alice, sent_while_away), "alice's messages acknowledged")
    first_away = timeline(alice)[-5][0]
    # An edit and a delete while bob is away: they reach him with the resume as well.
    alice_edit(alice, first_away, "while you were away 1 (edited)")
    alice_delete(alice, first_away + 1)
    # And a group with bob in it, created while he cannot hear of it.
    alice_token = js(alice, "return localStorage.getItem('chat.token')")
    status, me, _ = live.request("GET", "/api/v1/users/me/", token=js(bob, "return localStorage.getItem('chat.token')"))
    assert status == 200
    status, _, _ = live.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "title": "made while away", "participant_ids": [me["id"]]},
        token=alice_token,
    )
    assert status == 201
    browsers.step("bob-offline")

    bob.proxy.restore()
    wait_for(bob, lambda d: not banner_shown(bob), "bob back online", timeout=30)
    expected = ["hello bob", "typing a reply", "while you were away 1 (edited)", "This message was deleted.",
                *sent_while_away[2:], "written offline"]
    wait_for(bob, shows_texts(bob, expected), "every message at bob after the resume")
    assert pending(bob) == []
    wait_for(alice, shows_texts(alice, expected), "bob's offline message at alice")
    wait_for(bob, lambda d: "made while away" in list_entries(bob), "the group made while bob was away, by name")
    browsers.step("bob-back")
    assert [text for _, text in assert_in_order_once(bob)] == expected
    assert [text for _, text in assert_in_order_once(alice)] == expected
    # The send that waited went out once, however often it was tried.
    conversation_id = js(alice, "return location.hash.slice(3)").replace("-", "")
    with sqlite3.connect(live.env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        (last_seq,) = db.execute("SELECT last_seq FROM chat_conversation WHERE id = ?", [conversation_id]).fetchone()
    assert last_seq == len(expected)

    # And a report of alice's message from bob's side reaches the moderation queue.
    report = [b for b in bob.driver.find_elements(By.CSS_SELECTOR, "#messages li button") if b.text == "Report"][0]
    report.click()
    bob.driver.find_element(By.ID, "dialog-input").send_keys("spam")
    bob.driver.find_element(By.ID, "dialog-ok").click()
    wait_for(bob, lambda d: "moderators will look" in d.find_element(By.ID, "conversation-status").text, "report confirmed")
    with sqlite3.connect(live.env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        assert db.execute("SELECT reason FROM chat_report WHERE conversation_id = ?", [conversation_id]).fetchall() == [("spam",)]


def alice_edit(alice, seq: int, content: str) -> None:
    item = alice.driver.find_element(By.CSS_SELECTOR, f'#messages li[data-seq="{seq}"]')
    item.find_element(By.XPATH, ".//button[text()='Edit']").click()
    box = alice.driver.find_element(By.ID, "dialog-input")
    box.clear()
    box.send_keys(content)
    alice.driver.find_element(By.ID, "dialog-ok").click()
    wait_for(alice, lambda d: dict(timeline(alice))[seq] == content, "the edit shown")


def alice_delete(alice, seq: int) -> None:
    item = alice.driver.find_element(By.CSS_SELECTOR, f'#messages li[data-seq="{seq}"]')
    item.find_element(By.XPATH, ".//button[text()='Delete']").click()
    alice.driver.find_element(By.ID, "dialog-ok").click()
    wait_for(alice, lambda d: dict(timeline(alice))[seq] == "This message was deleted.", "the tombstone shown")


def test_a_removed_participant_loses_the_conversation(browsers, live):
    carol, dave = browsers("carol"), browsers("dave")
    signup(carol, "carol")
    signup(dave, "dave")
    start_conversation(carol, ["dave"], title="project")
    open_conversation(dave, "project")
    send(carol, "welcome")
    wait_for(dave, shows_texts(dave, ["welcome"]), "dave sees the group's message")
    browsers.step("both-in-group")

    carol.driver.find_element(By.ID, "toggle-people").click()
    carol.driver.find_element(By.CSS_SELECTOR, "#people-list button[aria-label='Remove dave']").click()
    wait_for(carol, lambda d: "dave" not in d.find_element(By.ID, "people-list").text, "dave gone from carol's people")
    wait_for(dave, lambda d: "project" not in list_entries(dave), "the conversation dropped from dave's list")
    wait_for(dave, lambda d: d.find_element(By.ID, "empty-state").text == "You were removed from “project”.", "notice")
    assert not dave.driver.find_element(By.ID, "conversation-pane").is_displayed()
    browsers.step("dave-removed")
    # What carol writes now never reaches dave.
    send(carol, "after dave left")
    wait_for(carol, shows_texts(carol, ["welcome", "after dave left"]), "carol's message")
    time.sleep(1)
    assert "project" not in list_entries(dave)

    # Logging out revokes this browser's token on the server and shows the log-in form.
    dave_token = js(dave, "return localStorage.getItem('chat.token')")
    dave.driver.find_element(By.ID, "logout").click()
    wait_for(dave, lambda d: d.find_element(By.ID, "auth-view").is_displayed(), "the log-in form after logging out")
    assert js(dave, "return localStorage.getItem('chat.token')") is None
    status, _, _ = live.request("GET", "/api/v1/users/me/", token=dave_token)
    assert status == 401


def test_history_pages_upward_on_a_phone_sized_screen_and_nothing_leaves_the_origin(browsers, live):
    erin_id, erin_token = live.signup("erin")
    frank_id, _ = live.signup("frank")
    status, conversation, _ = live.request(
        "POST", "/api/v1/conversations/", {"kind": "direct", "participant_ids": [frank_id]}, token=erin_token
    )
    assert status == 201, conversation
    for i in range(1, 71):
        status, _, _ = live.request(
            "POST", "/api/v1/messages/", {"conversation_id": conversation["id"], "content": f"history {i}"}, token=erin_token
        )
        assert status == 201

    frank = browsers("frank", width=390, height=844)
    driver = frank.driver
    wait_for(frank, lambda d: d.find_element(By.ID, "auth-view").is_displayed(), "the log-in form")
    driver.find_element(By.ID, "auth-username").send_keys("frank")
    driver.find_element(By.ID, "auth-password").send_keys(PASSWORD, Keys.ENTER)
    wait_for(frank, lambda d: list_entries(frank).get("erin") == 70, "70 unread from erin")
    browsers.step("phone-list")
    # One column on a phone: the list, then the conversation in its place, and back.
    open_conversation(frank, "erin")
    assert not driver.find_element(By.ID, "sidebar").is_displayed()
    wait_for(frank, lambda d: len(timeline(frank)) == 50, "the newest page")
    assert [text for _, text in timeline(frank)] == [f"history {i}" for i in range(21, 71)]
    # Scrolling to the top reads the page before it (the "Load older messages" button does too).
    js(frank, "document.querySelector('#timeline').scrollTop = 0")
    wait_for(frank, lambda d: len(timeline(frank)) == 70, "the older page above it")
    assert [text for _, text in assert_in_order_once(frank)] == [f"history {i}" for i in range(1, 71)]
    assert not driver.find_element(By.ID, "older").is_displayed()
    browsers.step("phone-history")
    wait_for(frank, lambda d: list_entries(frank).get("erin") == 0, "all read")
    # Keyboard: the composer is reachable and sends with Enter.
    driver.find_element(By.ID, "composer-input").send_keys("read them all", Keys.ENTER)
    wait_for(frank, shows_texts(frank, ["history 70", "read them all"]), "frank's message")
    driver.find_element(By.ID, "back").click()
    wait_for(frank, lambda d: d.find_element(By.ID, "sidebar").is_displayed(), "back to the list")

    origin = frank.proxy.url
    ws_origin = origin.replace("http://", "ws://")
    made = requests_made(driver, origin)
    assert made, "the performance log recorded no request"
    foreign = [url for url in made if not (url.startswith(origin + "/") or url.startswith(ws_origin + "/") or url.startswith(("data:", "blob:")))]
    assert foreign == []
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
