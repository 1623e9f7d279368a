"""The page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) enters
the API key, chats in two turns (the streamed answers appear), runs one arena round, votes, and sees
the hidden names and the leaderboard change; the page at a phone's width (390 px) and a desktop's
(1280 px): nothing wider than the screen, the settings fold away; /favicon.ico. Screenshots are
saved in the test artifacts directory ($LLM_JAX_TEST_ARTIFACTS, else tests/artifacts/)."""

import io
import os
import pathlib
import shutil
import time

import httpx2 as httpx
import pytest

from tests import serve_testlib

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
AUTH = {"Authorization": f"Bearer {serve_testlib.API_KEY}"}
ARTIFACTS = pathlib.Path(os.environ.get("LLM_JAX_TEST_ARTIFACTS")
                         or pathlib.Path(__file__).parent / "artifacts")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  yield serve_testlib.session_server(tmp_path_factory)
  serve_testlib.stop_session_server()


def _greedy(served, messages):
  body = {"model": "sft", "messages": messages, "temperature": 0, "top_p": 0.9,
          "repetition_penalty": 1.1}
  r = httpx.post(served["url"] + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
  return r.json()["choices"][0]["message"]["content"]


def test_page_chat_and_arena(served):
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  url = served["url"]
  board = lambda: {r["model"]: r for r in httpx.get(url + "/arena/leaderboard", headers=AUTH, timeout=30)
                   .json()["leaderboard"]}
  before = board()
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(url + "/")
      page.wait_for_selector("#notice:not([hidden])")  # the server has a key: the page asks for it
      page.fill("#api-key", serve_testlib.API_KEY)
      page.dispatch_event("#api-key", "change")
      page.wait_for_function("document.querySelectorAll('#model-select option').length == 2")
      page.select_option("#model-select", "sft")
      page.fill("#temperature", "0")

      # Two turns: each streamed answer is the greedy answer to the whole conversation so far.
      conversation = []
      for question in ("你好", "What is the capital of Mars?"):
        page.fill("#chat-input", question)
        page.press("#chat-input", "Enter")
        n = len(conversation) // 2 + 1
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant:not(.streaming)').length == {n}")
        conversation.append({"role": "user", "content": question})
        answer = page.locator(".msg.assistant").nth(n - 1).inner_text()
        assert answer == _greedy(served, conversation), answer
        conversation.append({"role": "assistant", "content": answer})
      assert conversation[1]["content"] == "你好！我是一个小模型，很高兴见到你。"
      assert page.locator(".msg.user").nth(0).inner_text() == "你好"
      assert page.is_disabled("#chat-stop") and page.is_enabled("#chat-send")
      page.screenshot(path=str(ARTIFACTS / "serve_chat.png"), full_page=True)

      # Stop: the engine holds the answer after its first token until the page has hung up.
      weak = served["app"].state.models["weak"].engine
      held = []

      def hold_until_cancelled(rows):
        for _, s in rows:
          if not held:
            held.append(s)
            deadline = time.time() + 60
            while not s.cancelled and time.time() < deadline:
              time.sleep(0.01)

      cancelled_before = weak.snapshot()["cancelled"]
      weak.on_step = hold_until_cancelled
      try:
        page.select_option("#model-select", "weak")
        page.fill("#chat-input", "Tell me a story.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 3 && "
                               "document.querySelectorAll('.msg.assistant')[2].textContent.length > 0")
        page.click("#chat-stop")
        page.wait_for_selector(".msg.assistant .meta")
      finally:
        weak.on_step = None
      assert page.locator(".msg.assistant .meta").inner_text() == "[stopped]"
      assert held[0].cancelled
      # The page shows [stopped] as soon as it hangs up; the engine counts the cancellation when
      # its loop next runs (CI once read the counter in between).
      deadline = time.time() + 30
      while weak.snapshot()["cancelled"] == cancelled_before and time.time() < deadline:
        time.sleep(0.05)
      assert weak.snapshot()["cancelled"] == cancelled_before + 1
      assert page.is_enabled("#chat-send")

      # One arena round: two anonymous answers, a vote, then the names and the leaderboard.
      page.click("#tab-arena")
      page.fill("#arena-prompt", "火星的首都是什么？")
      page.click("#arena-start")
      page.wait_for_selector("#vote-a:enabled")
      answers = [page.inner_text(f"#arena-{s} .answer") for s in "ab"]
      assert all(answers) and page.inner_text("#arena-a .name") == page.inner_text("#arena-b .name") == ""
      page.click("#vote-a")
      page.wait_for_function("document.querySelector('#arena-a .name').textContent.length > 0")
      names = [page.inner_text(f"#arena-{s} .name").lstrip("— ") for s in "ab"]
      assert sorted(names) == ["sft", "weak"]
      assert "A was " + names[0] in page.inner_text("#arena-result")
      rows = page.locator("#panel-arena .leaderboard tbody tr")
      assert rows.count() == 2
      shown = {rows.nth(i).locator("td").nth(1).inner_text(): rows.nth(i).locator("td").nth(4).inner_text()
               for i in range(2)}
      assert int(shown[names[0]]) == before[names[0]]["wins"] + 1  # the winner's wins, as the page shows them
      page.screenshot(path=str(ARTIFACTS / "serve_arena.png"), full_page=True)
      page.click("#tab-board")
      assert page.locator("#panel-board .leaderboard tbody tr").count() == 2
      assert not errors, errors
    finally:
      browser.close()
  after = board()
  assert after[names[0]]["wins"] == before[names[0]]["wins"] + 1
  assert after[names[0]]["battles"] == before[names[0]]["battles"] + 1
  print(f"screenshots: {ARTIFACTS / 'serve_chat.png'} {ARTIFACTS / 'serve_arena.png'}")


def _overflow(page) -> dict:
  """How far the page and the conversation reach past the screen's right edge (0 = not at all)."""
  return page.evaluate("""() => {
    const right = (sel) => Math.max(0, ...[...document.querySelectorAll(sel)].map(
        (e) => e.getBoundingClientRect().right));
    return {page: document.documentElement.scrollWidth - window.innerWidth,
            conversation: right('.conversation, .messages, .msg, .composer') - window.innerWidth};
  }""")


@pytest.mark.parametrize("width", [390, 1280])
def test_page_fits_phone_and_desktop_and_settings_fold(served, width):
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  url = served["url"]
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    try:
      page = browser.new_page(viewport={"width": width, "height": 844 if width < 500 else 900})
      errors, not_found = [], []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.on("response", lambda r: r.status == 404 and not_found.append(r.url))
      page.goto(url + "/")
      page.fill("#api-key", serve_testlib.API_KEY)
      page.dispatch_event("#api-key", "change")
      page.wait_for_function("document.querySelectorAll('#model-select option').length == 2")
      # A phone shows the conversation first, the settings folded; a wide screen shows them.
      phone = width < 500
      assert page.is_visible("#settings") == (not phone)
      assert page.get_attribute("#settings-toggle", "aria-expanded") == str(not phone).lower()
      # A question with a long unbroken word (the run's context is 128 tokens: it fits).
      page.fill("#chat-input", "韩晓出生在哪里？ https://example.com/a_very_long_unbroken_path_name")
      page.press("#chat-input", "Enter")
      page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length == 1")
      assert max(_overflow(page).values()) <= 0, _overflow(page)
      page.screenshot(path=str(ARTIFACTS / f"page_{width}.png"), full_page=True)

      page.click("#settings-toggle")  # unfold on a phone, fold on a desktop
      assert page.is_visible("#settings") == phone
      assert page.is_visible("#temperature") == phone
      assert max(_overflow(page).values()) <= 0, _overflow(page)
      page.screenshot(path=str(ARTIFACTS / f"page_{width}_settings_toggled.png"), full_page=True)
      page.click("#settings-toggle")
      assert page.is_visible("#settings") == (not phone)

      page.click("#tab-arena")
      page.fill("#arena-prompt", "火星的首都是什么？")
      page.click("#arena-start")
      page.wait_for_selector("#vote-a:enabled")
      assert max(_overflow(page).values()) <= 0, _overflow(page)
      page.screenshot(path=str(ARTIFACTS / f"arena_{width}.png"), full_page=True)
      assert not errors, errors
      assert not not_found, not_found  # the favicon included
    finally:
      browser.close()


def test_favicon_is_served_without_the_key(served):
  from PIL import Image
  r = httpx.get(served["url"] + "/favicon.ico", timeout=30)
  assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
  with Image.open(io.BytesIO(r.content)) as im:
    assert im.format == "ICO" and (32, 32) in im.info["sizes"]
