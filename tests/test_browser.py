"""The page in a real browser: Debian's headless Chromium driven by Playwright for Python (never
`playwright install`: the browser is the system's, /usr/bin/chromium). One browser for the
module; each page gets its own context, so its own localStorage, as two people would have.

Set CHATROOM_SCREENSHOT=PATH to keep the screenshot of a real session (docs/browser.png)."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("websockets")
pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from .conftest import WAIT_SECONDS, Client, Room, Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = WAIT_SECONDS * 1000

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason=f"needs Chromium at {CHROMIUM} (apt install chromium)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Pages:
    """Opens pages, each in a context of its own, and closes them all."""

    def __init__(self, browser: Browser) -> None:
        self._browser = browser
        self._contexts: list[BrowserContext] = []
        self.errors: list[str] = []  # the pages' console errors and uncaught exceptions

    def open(
        self, url: str, width: int = 900, height: int = 560, beside: Page | None = None
    ) -> Page:
        """A page in a context of its own, or in beside's (another tab: the same storage)."""
        if beside is None:
            context = self._browser.new_context(viewport={"width": width, "height": height})
            self._contexts.append(context)
        else:
            context = beside.context
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )
        page.goto(url)
        return page

    def close(self) -> None:
        for context in self._contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Pages]:
    pages = Pages(browser)
    try:
        yield pages
    finally:
        pages.close()


def in_the_room(page: Page) -> None:
    expect(page.locator("#state")).to_have_text("in the room", timeout=WAIT_MS)


def take_name(page: Page, name: str) -> None:
    """Types a name and Enter, as a person would: the page sends /nick and remembers it."""
    page.locator("#name").fill(name)
    page.locator("#name").press("Enter")
    expect(page.locator("#log li").last).to_contain_text(f"You are now {name}@", timeout=WAIT_MS)


def say(page: Page, text: str) -> None:
    page.locator("#text").fill(text)
    page.locator("#text").press("Enter")


def shows(page: Page, text: str) -> None:
    expect(page.locator("#log li", has_text=text).first).to_be_visible(timeout=WAIT_MS)


def test_two_pages_and_a_terminal_chat_in_one_room_and_a_leaving_page_is_seen(
    room: Room, pages: Pages
) -> None:
    server = room.server()
    url = f"http://127.0.0.1:{server.port}/"
    terminal = room.client(server.port, "--name", "carol")
    terminal.stdout.expect("You are now carol@")
    terminal.type_line("morning, all")
    alice = pages.open(url)
    in_the_room(alice)
    shows(alice, "History: 1 line said before you came")
    shows(alice, "morning, all")
    take_name(alice, "alice")
    bob = pages.open(url)
    in_the_room(bob)
    take_name(bob, "bob")
    shows(alice, "is now bob@")
    terminal.stdout.expect("is now bob@")

    say(alice, "hello from a browser")
    shows(bob, "hello from a browser")
    terminal.stdout.expect("hello from a browser")
    terminal.type_line("hello from a terminal")
    shows(alice, "hello from a terminal")
    shows(bob, "hello from a terminal")
    say(bob, "/me waves")
    shows(alice, "* waves")
    say(alice, "/msg bob just between us")
    shows(bob, "(private)")
    shows(alice, "Private to bob@")
    expect(alice.locator("#people li")).to_have_count(3, timeout=WAIT_MS)  # who is here
    say(bob, "<b>not bold</b> & <img src=x onerror=alert(1)>")
    shows(alice, "<b>not bold</b> & <img src=x onerror=alert(1)>")  # text, never HTML
    assert alice.locator("#log b, #log img").count() == 0

    screenshot = os.environ.get("CHATROOM_SCREENSHOT")
    if screenshot:
        alice.screenshot(path=screenshot)

    bob.context.close()  # bob closes the tab
    shows(alice, "left (")
    terminal.stdout.expect("left (")
    expect(alice.locator("#people li")).to_have_count(2, timeout=WAIT_MS)
    assert pages.errors == []


class OtherSite(http.server.BaseHTTPRequestHandler):
    """A page on another origin that tries to make its visitor's browser join the room."""

    chat_port = 0

    def do_GET(self) -> None:
        body = (
            "<!doctype html><title>other</title><script>"
            f"const ws = new WebSocket('ws://127.0.0.1:{self.chat_port}/ws');"
            "ws.onopen = () => { ws.send('!Join'); document.title = 'joined'; };"
            "ws.onclose = (e) => { document.title = 'closed ' + e.code; };"
            "</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test's output is for the test


@pytest.fixture
def other_site(room: Room) -> Iterator[tuple[Server, str]]:
    server = room.server()
    handler = type("Handler", (OtherSite,), {"chat_port": server.port})
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, name="other-site")
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()
        thread.join(WAIT_SECONDS)


def test_a_page_from_another_origin_is_refused_and_nobody_joins(
    room: Room, pages: Pages, other_site: tuple[Server, str]
) -> None:
    server, other_url = other_site
    terminal = room.client(server.port)
    page = pages.open(other_url)
    expect(page).to_have_title("closed 1006", timeout=WAIT_MS)  # the handshake got a 403
    terminal.type_line("/who")
    terminal.stdout.expect(f"* 1 here: {terminal.member_id}")
    assert not any("joined" in line for line in terminal.stdout.lines)


def test_an_oversized_message_is_refused_and_the_member_stays(room: Room, pages: Pages) -> None:
    server = room.server("--max-line", "200")
    terminal = room.client(server.port)
    page = pages.open(f"http://127.0.0.1:{server.port}/")
    in_the_room(page)
    say(page, "x" * 250)
    shows(page, "ERROR :Line too long (max 200 bytes)")
    say(page, "still here")
    terminal.stdout.expect("still here")
    expect(page.locator("#state")).to_have_text("in the room")


def test_the_page_reconnects_after_a_server_restart_with_its_name(room: Room, pages: Pages) -> None:
    first = room.server()
    page = pages.open(f"http://127.0.0.1:{first.port}/")
    in_the_room(page)
    take_name(page, "dana")
    first.stop()
    expect(page.locator("#state")).to_contain_text("disconnected", timeout=WAIT_MS)
    expect(page.locator("#people li")).to_have_count(0)
    second = room.server("--port", str(first.port))
    terminal: Client = room.client(second.port)
    in_the_room(page)
    terminal.stdout.expect("* dana@")  # joined again under the name it remembered
    say(page, "back again")
    terminal.stdout.expect("back again")


def test_the_page_works_at_a_phone_width_with_the_keyboard_only(room: Room, pages: Pages) -> None:
    server = room.server()
    terminal = room.client(server.port)
    page = pages.open(f"http://127.0.0.1:{server.port}/", width=360, height=640)
    in_the_room(page)
    shows(page, "Type a name in the Name box")  # no name remembered yet: it asks for one
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scroll
    expect(page.locator("#text")).to_be_focused()
    page.keyboard.type("typed, never clicked")
    page.keyboard.press("Enter")
    terminal.stdout.expect("typed, never clicked")


def test_the_log_stops_following_when_the_reader_scrolls_up(room: Room, pages: Pages) -> None:
    server = room.server("--flood-rate", "0")
    terminal = room.client(server.port)
    page = pages.open(f"http://127.0.0.1:{server.port}/", height=400)
    in_the_room(page)
    for n in range(40):
        terminal.type_line(f"line {n}")
    shows(page, "line 39")
    at_bottom = "(() => { const l = document.getElementById('log');"
    at_bottom += " return l.scrollHeight - l.scrollTop - l.clientHeight < 40; })()"
    assert page.evaluate(at_bottom)
    page.evaluate("document.getElementById('log').scrollTop = 0")
    terminal.type_line("one more")
    shows(page, "one more")
    assert page.evaluate("document.getElementById('log').scrollTop") == 0


def test_a_second_tab_with_the_same_remembered_name_still_joins(room: Room, pages: Pages) -> None:
    server = room.server()
    terminal = room.client(server.port)
    url = f"http://127.0.0.1:{server.port}/"
    first = pages.open(url)
    in_the_room(first)
    take_name(first, "erin")
    second = pages.open(url, beside=first)  # remembers erin, which the first tab holds
    in_the_room(second)
    shows(second, "ERROR :Name taken: erin")
    say(second, "from the second tab")
    terminal.stdout.expect("from the second tab")
