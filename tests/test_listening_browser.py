"""The listening-test pages in a real headless browser: Debian's chromium, driven by Playwright.

A scripted participant takes each test (the loop page from ``file://``, a mixing kit from a local
static server that also receives the POSTed answers), downloads the answers, and the downloads go
through ``listening_test.py analyse``. Without chromium or Playwright the tests skip, except under
CI (``CI`` set), where ``.ci/run`` installs both and a missing browser is a failure.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import listening_test
from datamodules.pianoroll import pack_phrases, write_phrase_cache
from tests.test_listening_build import groove, kit_test, write_wav

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless with no sandbox (tests run as root) and none of chromium's background connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SR = 44100


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed")
    if not Path(CHROMIUM).is_file():
        unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary --user-data-dir.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Participant:
    """A fresh browser profile on one page, recording every console error and uncaught exception."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)

    def start(self, name: str) -> None:
        self.page.fill("#participant", name)
        self.page.click("#start")

    def saved_state(self) -> dict:
        return self.page.evaluate("JSON.parse(localStorage.getItem(Object.keys(localStorage)[0]))")

    def download(self, button: str, path: Path) -> Path:
        with self.page.expect_download() as download:
            self.page.click(button)
        download.value.save_as(path)
        return path

    def close(self) -> None:
        self.context.close()


def build(*args) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        assert listening_test.main(["build", *map(str, args)]) == 0, stderr.getvalue()


def analyse(*args) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert listening_test.main(["analyse", *map(str, args)]) == 0, stderr.getvalue()
    return stdout.getvalue()


@pytest.fixture(scope="module")
def loop_kit(tmp_path_factory):
    """Three loops of each of two systems (8-bar loops at 240 BPM: 8 s) and three familiarisation loops."""
    root = tmp_path_factory.mktemp("loop_kit")
    rng = np.random.default_rng(2)
    write_phrase_cache(root / "loops", pack_phrases(groove(rng, 12)), ["a.mid"] * 12, np.arange(12))
    (root / "generated").mkdir()
    np.savez_compressed(root / "generated" / "phrases.npz", packed=pack_phrases(groove(rng, 6)))
    build("kind=loops", "systems={Training set: %s, VQ-VAE+LSTM: %s}" % (root / "loops", root / "generated"),
          f"out={root / 'kit'}", "samples=3", "tempo=240", "min_listen_seconds=1")
    return root / "kit"


class AnswerServer:
    """A static file server on 127.0.0.1 that also records POSTed bodies (and allows any origin)."""

    def __init__(self, root: Path):
        self.posted: list[str] = []
        posted = self.posted

        class Handler(SimpleHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                posted.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(200)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(b"stored")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mixing_kit(tmp_path_factory):
    """A served mixing kit (2 songs x 3 attributes, 4 stimuli of 4 s) that POSTs to its own server."""
    root = tmp_path_factory.mktemp("mixing_kit")
    rng = np.random.default_rng(4)
    t = np.arange(6 * SR) / SR
    for song in ("song_a", "song_b"):
        stems = {"vocals": 0.2 * np.sin(2 * np.pi * 440 * t), "bass": 0.3 * np.sin(2 * np.pi * 55 * t),
                 "drums": 0.1 * rng.standard_normal(len(t)), "other": 0.1 * np.sin(2 * np.pi * 330 * t)}
        for name, audio in stems.items():
            write_wav(root / "stems" / song / f"{name}.wav", np.stack([audio, audio]))
        total = sum(stems.values())
        for system, audio in {"target": np.stack([total, 0.7 * total]), "sum": 0.5 * np.stack([total, total]),
                              "fxnorm": np.stack([0.8 * total, total])}.items():
            write_wav(root / "evaluation" / "mixes" / system / f"{song}.wav", audio)
    server = AnswerServer(root / "served")
    build("kind=mixing", f"mixes={root / 'evaluation'}", f"stems={root / 'stems'}", f"out={root / 'served' / 'kit'}",
          "excerpt_seconds=4", f"post_url={server.url}/answers")
    yield root / "served" / "kit", server
    server.close()


def test_loop_page_from_file_url_scripted_participant_reload_download_and_analyse(browser, loop_kit, tmp_path):
    test = kit_test(loop_kit)
    participant = Participant(browser, (loop_kit / "index.html").as_uri())
    page = participant.page
    participant.start("alice")
    page.wait_for_selector("button.play:not([disabled])")
    familiar = page.locator("button.play")
    assert familiar.count() == 3
    for index in range(3):
        assert page.locator("#next").is_disabled()  # every example is heard first
        familiar.nth(index).click()
        assert familiar.nth(index).get_attribute("data-seconds") == "8.000"  # decoded: 8 bars at 240 BPM
    page.click("#next")

    rated = []
    while page.locator("#play").count():
        page.wait_for_selector("#play:not([disabled])")
        position = len(rated) + 1
        assert page.inner_text("#progress-label") == f"Loop {position} of 6"
        assert page.get_attribute("#play", "data-seconds") == "8.000"
        assert page.locator("input[name=rating]").first.is_disabled()  # locked until 1 s is heard
        page.wait_for_selector("input[name=rating]:not([disabled])", timeout=20000)
        assert page.locator("#next").is_disabled()  # no answer, no next page
        page.check(f"input[name=rating][value='{1 + len(rated) % 5}']")
        if position == 2:
            page.reload()  # the answers so far survive, and the page resumes at this loop
            page.wait_for_selector("#play:not([disabled])")
            assert page.inner_text("#progress-label") == "Loop 2 of 6"
            assert page.is_checked("input[name=rating][value='2']")
            assert len(participant.saved_state()["ratings"]) == 1
        rated.append(page.get_attribute("#play", "data-stimulus"))
        page.click("#next")

    assert sorted(rated) == sorted(s["id"] for s in test["stimuli"])
    answers = participant.download("#download-json", tmp_path / "alice.json")
    table = participant.download("#download-csv", tmp_path / "alice.csv")
    assert participant.errors == []
    participant.close()

    document = json.loads(answers.read_text())
    assert document["participant"] == "alice" and document["test"]["id"] == test["id"]
    systems = {s["id"]: s["system"] for s in test["stimuli"]}
    ratings = document["ratings"]
    assert [r["stimulus"] for r in ratings] == rated
    assert all(r["system"] == systems[r["stimulus"]] and r["seed"] == document["seed"] for r in ratings)
    assert all(r["test"] == test["id"] for r in ratings)
    assert table.read_text().splitlines()[1].split(",")[8] == test["id"]  # the CSV names its test too
    assert [r["score"] for r in ratings] == [1 + k % 5 for k in range(6)]
    out = tmp_path / "report"
    stdout = analyse(answers, table, f"out={out}")
    assert "6 answers appeared in two files" in stdout
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(line.split(",")[2] == "3" for line in summary[1:])


def test_mixing_page_switches_in_place_requires_every_answer_and_posts_them(browser, mixing_kit, tmp_path):
    kit, server = mixing_kit
    test = kit_test(kit)
    participant = Participant(browser, f"{server.url}/kit/index.html?seed=11")
    page = participant.page
    participant.start("bob")
    orders = []
    for number in range(1, 7):
        page.wait_for_selector("#seek:not([disabled])")
        assert page.inner_text("#progress-label") == f"Page {number} of 6"
        clips = page.locator("button.play")
        assert clips.count() == 8  # four stems, four mixes
        assert {clips.nth(i).get_attribute("data-seconds") for i in range(8)} == {"4.000"}
        mixes = page.locator(".stimulus button.play")
        orders.append([mixes.nth(i).get_attribute("data-clip") for i in range(4)])
        mixes.nth(0).click()
        page.wait_for_timeout(1200)
        before = float(page.input_value("#seek"))
        mixes.nth(1).click()
        page.wait_for_timeout(400)
        after = float(page.input_value("#seek"))
        assert 0.5 < before < after < 3.5  # the second mix went on from where the first was
        mixes.nth(2).click()
        page.locator(".reference button.play").nth(0).click()
        assert page.locator("#next").is_disabled()  # one mix not played, no slider moved
        mixes.nth(3).click()
        sliders = page.locator(".stimulus input[type=range]")
        for i in range(4):
            assert page.locator("#next").is_disabled()
            sliders.nth(i).evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", 10 + 25 * i)
        page.click("#next")
    page.wait_for_function("document.getElementById('post-status').textContent.includes('sent')")
    answers = participant.download("#download-json", tmp_path / "bob.json")
    assert participant.errors == []
    participant.close()

    document = json.loads(answers.read_text())
    assert len(server.posted) == 1 and json.loads(server.posted[0])["ratings"] == document["ratings"]
    ratings = document["ratings"]
    assert len(ratings) == 24
    assert {(r["song"], r["attribute"]) for r in ratings} == {
        (song, attribute) for song in ("song_a", "song_b") for attribute in ("Production Value", "Clarity", "Excitement")}
    systems = {s["id"]: s["system"] for song in test["songs"] for s in song["stimuli"]}
    assert all(r["system"] == systems[r["stimulus"]] for r in ratings)
    assert len({tuple(clip[6:] for clip in order) for order in orders}) > 1  # stimulus order drawn per page
    out = tmp_path / "report"
    stdout = analyse(answers, f"out={out}")
    assert "Friedman chi-square = " in stdout
    assert "| bob | 6 | 6 | 100% | fails |" in stdout  # the hidden reference got 10 to 85, never 90


def test_presentation_order_depends_on_the_seed_alone(browser, loop_kit):
    def order(query: str = "") -> tuple[int, list]:
        participant = Participant(browser, (loop_kit / "index.html").as_uri() + query)
        participant.start("someone")
        state = participant.saved_state()
        participant.close()
        return state["seed"], [page["stimuli"][0] for page in state["pages"]]

    seed, first = order("?seed=7")
    assert seed == 7 and order("?seed=7")[1] == first
    assert order("?seed=8")[1] != first
    (seed_a, _), (seed_b, _) = order(), order()
    assert seed_a != seed_b  # two participants draw their own seeds
