"""`python -m flux_lora.report rate`: the real server on 127.0.0.1, used through HTTP and through headless chromium."""

from __future__ import annotations

import json
import re
import select
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import spearmanr

from tests.cli import ONE_THREAD, run_cli, start_cli
from tests.report.cdp import Chromium, chromium_binary
from tests.report.conftest import copy_sweep, md_row


class RateServer:
    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        self.process = start_cli("rate", str(sweep_dir), module="flux_lora.report", env=ONE_THREAD, merge_stderr=False)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        self.banner = self.process.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", self.banner)
        assert match, (
            f"no address printed: {self.banner!r} {self.process.stderr.read() if self.process.poll() is not None else ''}"
        )  # type: ignore[union-attr]
        self.url = match.group(0)

    def get(self, path: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
                return response.status, response.read(), response.headers["Content-Type"]
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers["Content-Type"]

    def post(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url + "api/rate", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def items(self, rater: str) -> list[dict[str, Any]]:
        status, body, _ = self.get(f"api/items?rater={rater}")
        assert status == 200
        return json.loads(body)["prompts"]

    def stop(self) -> None:
        self.process.terminate()  # only the server this test started
        self.process.wait(timeout=10)


def ratings(sweep_dir: Path, rater: str | None = None) -> list[dict[str, Any]]:
    path = sweep_dir / "ratings.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in lines if rater is None or r["rater"] == rater]


@pytest.fixture(scope="module")
def rate_server(evaluated_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RateServer]:
    server = RateServer(copy_sweep(evaluated_sweep, tmp_path_factory.mktemp("rate") / "sweep"))
    yield server
    server.stop()


@pytest.mark.slow
def test_rate_refuses_a_sweep_without_samples(evaluated_sweep: Path, tmp_path: Path) -> None:
    bare = copy_sweep(evaluated_sweep, tmp_path / "bare")
    for folder in bare.glob("*/output/sample"):
        shutil.rmtree(folder)
    done = run_cli("rate", str(bare), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {bare}: no sample images in any run") and "sample_every_n_steps" in line


@pytest.mark.slow
def test_rate_over_http_is_blind_and_appends_at_once(rate_server: RateServer) -> None:
    assert "30 images, 5 prompts, 2 cells" in rate_server.banner  # the final samples: 6 runs x 5 prompts
    status, page, kind = rate_server.get("/")
    assert status == 200 and kind.startswith("text/html") and b"Blind rating" in page
    prompts = rate_server.items("http-check")
    assert [p["index"] for p in prompts] == [0, 1, 2, 3, 4] and all(len(p["images"]) == 6 for p in prompts)
    # Blind: nothing the page receives names a cell, a run or a seed.
    for text in (page.decode(), json.dumps(prompts)):
        assert not re.search(r"baseline|a1_alpha|seed\d|tiny-smoke|sample/", text)
    token = prompts[0]["images"][0]["token"]
    status, png, kind = rate_server.get(f"/img/{token}")
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")

    assert rate_server.post({"rater": "http-check", "token": token, "score": 4}) == (200, {"ok": True})
    (entry,) = ratings(rate_server.sweep_dir, "http-check")  # on disk before the answer came back
    assert (
        entry["score"] == 4
        and entry["prompt"] == 0
        and entry["run"] in entry["image"]
        and entry["cell"] in entry["run"]
    )
    assert set(entry) == {"rater", "image", "cell", "run", "seed", "prompt", "score", "time"}
    assert (rate_server.sweep_dir / entry["image"]).read_bytes() == png
    # Refused without a line written: a score outside 1-5, no rater, an unknown image, not JSON.
    assert rate_server.post({"rater": "http-check", "token": token, "score": 7})[0] == 400
    assert rate_server.post({"rater": " ", "token": token, "score": 3})[0] == 400
    assert rate_server.post({"rater": "http-check", "token": "0" * 16, "score": 3})[0] == 404
    assert rate_server.get("/nothing")[0] == 404
    assert len(ratings(rate_server.sweep_dir, "http-check")) == 1
    # A returning rater sees their score again (and nobody else's).
    again = {i["token"]: i["score"] for i in rate_server.items("http-check")[0]["images"]}
    assert again[token] == 4 and sorted(v for v in again.values() if v) == [4]
    assert all(i["score"] is None for i in rate_server.items("someone-else")[0]["images"])


@pytest.mark.slow
@pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed (.ci/run installs it with apt-get)")
def test_rating_with_keys_and_a_click_in_chromium_then_the_report_unblinds(rate_server: RateServer) -> None:
    keys = ["5", "4", "3", "2", "1", "3"]
    with Chromium(width=1700, height=1000) as browser:
        page = browser.open_page()
        browser.navigate(page, rate_server.url + "?rater=browser")
        browser.wait_for(
            page,
            "document.querySelectorAll('.item img').length === 6 && [...document.images].every(i => i.complete && i.naturalWidth > 0)",
        )
        assert browser.evaluate(page, "document.getElementById('progress').textContent").startswith("Prompt 1 of 5")
        for key in keys:  # real key presses: each rates the outlined image and moves on
            browser.press(page, key)
        browser.wait_for(page, "document.getElementById('progress').textContent.startsWith('Prompt 2 of 5')")
        browser.wait_for(page, "document.querySelectorAll('.item img').length === 6")
        browser.click(page, ".item:nth-child(2) button[data-score='2']")  # a real mouse click on prompt 2
        deadline = time.monotonic() + 120  # generous: a busy machine must not fail the test
        while len(ratings(rate_server.sweep_dir, "browser")) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The server writes the rating before it answers: the page says so once the answer is back.
        status_line = browser.wait_for(
            page, "(t => t.startsWith('Saved') ? t : '')(document.getElementById('status').textContent)", timeout=120
        )
        urls = browser.requested_urls(page)
    lines = ratings(rate_server.sweep_dir, "browser")
    # Sorted: the page posts each rating without waiting for the last, so under load they may land out of order.
    assert sorted(r["prompt"] for r in lines) == [0] * 6 + [1] and status_line.startswith("Saved")
    first, (second,) = [r for r in lines if r["prompt"] == 0], [r for r in lines if r["prompt"] == 1]
    assert sorted(r["score"] for r in first) == sorted(int(k) for k in keys) and second["score"] == 2
    assert len({r["image"] for r in first}) == 6 and {r["cell"] for r in first} == {"baseline", "a1_alpha"}
    assert all(u.startswith(rate_server.url) for u in urls)  # the page asks only its own server

    # A second rater over HTTP, on the same six images, for agreement; then the report unblinds.
    for score, image in zip((1, 2, 3, 4, 5, 5), rate_server.items("alice")[0]["images"]):
        assert rate_server.post({"rater": "alice", "token": image["token"], "score": score})[0] == 200
    done = run_cli(str(rate_server.sweep_dir), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    md = (rate_server.sweep_dir / "report.md").read_text()
    assert "## Blind ratings" in md and "by 3 rater(s): alice, browser, http-check" in md
    headers = md_row(md, "cell")
    assert "rating 1-5" in headers and md_row(md, "a1_alpha")[headers.index("rating 1-5")] != "-"
    assert "| cell | rated runs | mean rating | 95% interval | vs baseline |" in md
    by_image = {r["image"]: r["score"] for r in ratings(rate_server.sweep_dir, "alice")}
    pairs = [(by_image[r["image"]], r["score"]) for r in lines[:6]]
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    assert md_row(md, "alice")[:4] == ["alice", "browser", "6", f"{rho:.2f}"]


@pytest.mark.slow
def test_the_rating_server_answers_bad_requests_with_a_4xx_and_writes_nothing(rate_server: RateServer) -> None:
    """A 10 MB body, JSON nested 100k deep, a float score, a form post, and a page on another origin that rebound its
    name to 127.0.0.1 (its own name arrives as Host): each one answered with a 4xx, none written down."""
    import http.client

    port = int(rate_server.url.rstrip("/").rsplit(":", 1)[1])
    token = rate_server.items("hardening")[0]["images"][0]["token"]

    def request(
        method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def announce(length: int) -> tuple[int, dict[str, Any]]:
        """Headers of a body of `length` bytes; the server must answer before any of it is sent."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.putrequest("POST", "/api/rate")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(length))
            connection.endheaders()
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    status, answer = announce(10_000_000)
    assert status == 413 and "at most 4096 bytes" in answer["error"]
    assert announce(200_000)[0] == 413  # 100k brackets deep is too long before it is too deep
    assert request("POST", "/api/rate", b"[" * 2000 + b"]" * 2000)[0] == 400  # deep enough to exhaust the parser
    assert rate_server.process.poll() is None  # still serving
    assert rate_server.post({"rater": "hardening", "token": token, "score": 3.0})[0] == 400
    assert (
        request(
            "POST",
            "/api/rate",
            json.dumps({"rater": "hardening", "token": token, "score": 3}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )[0]
        == 415
    )
    for method, path in (("GET", "/api/items?rater=hardening"), ("POST", "/api/rate")):
        status, answer = request(
            method,
            path,
            json.dumps({"rater": "hardening", "token": token, "score": 3}).encode(),
            {"Host": f"attacker.example:{port}"},
        )
        assert status == 403 and f"open http://127.0.0.1:{port}/" in answer["error"]
    assert ratings(rate_server.sweep_dir, "hardening") == []
    assert rate_server.post({"rater": "hardening", "token": token, "score": 3}) == (
        200,
        {"ok": True},
    )  # the page's own way
