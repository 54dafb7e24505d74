"""`python -m flux_lora.report rate SWEEP_DIR`: a local page for blind 1-5 ratings of a sweep's final samples.

Python's http.server on 127.0.0.1 and a free port. The page sees only random per-start tokens, never a
run's folder, cell or seed; each rating is appended to SWEEP_DIR/ratings.jsonl (and fsynced) before the
page hears "ok", so closing the tab loses nothing and several people can rate at once.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from flux_lora.report.collect import read_record
from flux_lora.report.ratings import RATINGS_FILE, SCORES, latest_scores, read_ratings
from flux_lora.report.samples import final_samples
from flux_lora.report.summary import find_run_dirs

PAGE = Path(__file__).parent / "templates" / "rate.html"
MAX_RATER_CHARS = 64
MAX_BODY_BYTES = 4096  # a rating is {rater, token, score}: about 100 bytes


@dataclass(frozen=True)
class RateItem:
    token: str  # what the page sees
    prompt: int
    image: Path
    image_name: str  # as recorded: relative to the sweep when inside it
    run: str  # the run's folder name in the sweep
    cell: str
    seed: int | None


@dataclass(frozen=True)
class RateSet:
    sweep_dir: Path
    items: dict[str, RateItem]
    prompts: dict[int, str]  # index -> prompt text


def collect_items(sweep_dir: Path) -> RateSet:
    items: dict[str, RateItem] = {}
    prompts: dict[int, str] = {}
    for cell_dir in find_run_dirs(sweep_dir):
        record = read_record(cell_dir)
        texts = [p.get("text", "") for p in ((record.config.get("dataset") or {}).get("sample_prompts") or [])]
        for sample in final_samples(record.home):
            try:
                name = sample.path.relative_to(sweep_dir).as_posix()
            except ValueError:
                name = str(sample.path)  # a pointer cell's run lives outside the sweep
            token = secrets.token_hex(8)
            items[token] = RateItem(token, sample.prompt, sample.path, name, cell_dir.name, record.cell, record.seed)
            prompts.setdefault(
                sample.prompt, texts[sample.prompt] if sample.prompt < len(texts) else f"prompt {sample.prompt}"
            )
    return RateSet(sweep_dir, items, dict(sorted(prompts.items())))


class RatingLog:
    """Appends one JSON line per rating; a lock keeps concurrent raters' lines whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def scores_of(self, rater: str) -> dict[str, int]:
        """image name -> this rater's latest score."""
        with self.lock:
            ratings, _ = read_ratings(self.path)
        return {image: entry["score"] for (who, image), entry in latest_scores(ratings).items() if who == rater}


def make_handler(rate_set: RateSet, log: RatingLog) -> type[BaseHTTPRequestHandler]:
    page = PAGE.read_bytes()

    class RateHandler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # one line per image fetched would bury the address printed at start

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _foreign_host(self) -> bool:
            """A page on another origin that rebinds its name to 127.0.0.1 sends its own name as Host: refuse it."""
            port = self.server.server_address[1]
            if self.headers.get("Host", "") in (f"127.0.0.1:{port}", f"localhost:{port}"):
                return False
            self._json(
                HTTPStatus.FORBIDDEN, {"error": f"Host {self.headers.get('Host')!r}: open http://127.0.0.1:{port}/"}
            )
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self._foreign_host():
                return
            url = urlparse(self.path)
            if url.path == "/":
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif url.path == "/api/items":
                rater = (parse_qs(url.query).get("rater") or [""])[0].strip()
                self._json(HTTPStatus.OK, self._items(rater))
            elif url.path.startswith("/img/") and (item := rate_set.items.get(url.path[len("/img/") :])):
                self._send(HTTPStatus.OK, item.image.read_bytes(), "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page or image: {url.path}"})

        def _items(self, rater: str) -> dict[str, Any]:
            scores = log.scores_of(rater) if rater else {}
            shuffle = random.Random()  # a new order on every load: position says nothing about the cell
            prompts = []
            for index, text in rate_set.prompts.items():
                tokens = [t for t, item in rate_set.items.items() if item.prompt == index]
                shuffle.shuffle(tokens)
                prompts.append(
                    {
                        "index": index,
                        "text": text,
                        "images": [{"token": t, "score": scores.get(rate_set.items[t].image_name)} for t in tokens],
                    }
                )
            return {"prompts": prompts, "scores": list(SCORES)}

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if self._foreign_host():
                return
            if urlparse(self.path).path != "/api/rate":
                self._json(HTTPStatus.NOT_FOUND, {"error": "POST /api/rate only"})
                return
            # JSON only: a cross-origin page cannot send it without a CORS preflight this server never answers.
            if self.headers.get_content_type() != "application/json":
                self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send Content-Type: application/json"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the unread body must not be taken for the next request
                self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"a rating is at most {MAX_BODY_BYTES} bytes of JSON"},
                )
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                rater, token, score = str(body["rater"]).strip(), str(body["token"]), body["score"]
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
                self._json(HTTPStatus.BAD_REQUEST, {"error": "send JSON {rater, token, score}"})
                return
            item = rate_set.items.get(token)
            if not rater or len(rater) > MAX_RATER_CHARS:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"rater: give a name of 1-{MAX_RATER_CHARS} characters"})
            elif type(score) is not int or score not in SCORES:  # 3.0 and true are not scores
                self._json(HTTPStatus.BAD_REQUEST, {"error": "score: an integer from 1 to 5"})
            elif item is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "unknown image (the server was restarted? reload the page)"})
            else:
                log.append(
                    {
                        "rater": rater,
                        "image": item.image_name,
                        "cell": item.cell,
                        "run": item.run,
                        "seed": item.seed,
                        "prompt": item.prompt,
                        "score": score,
                        "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                )
                self._json(HTTPStatus.OK, {"ok": True})

    return RateHandler


def serve(sweep_dir: Path, port: int = 0) -> int:
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir}: no such directory; pass a sweep directory under outputs/sweeps/", file=sys.stderr)
        return 2
    rate_set = collect_items(sweep_dir)
    if not rate_set.items:
        print(
            f"error: {sweep_dir}: no sample images in any run (output/sample/*.png); train with profile.sample_every_n_steps > 0 "
            "(or wait for the first samples), then rate",
            file=sys.stderr,
        )
        return 2
    log = RatingLog(sweep_dir / RATINGS_FILE)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(rate_set, log))
    cells = len({item.cell for item in rate_set.items.values()})
    print(
        f"rate: http://127.0.0.1:{server.server_port}/ ({len(rate_set.items)} images, {len(rate_set.prompts)} prompts, {cells} cells, "
        f"shown shuffled and unlabelled); ratings are appended to {log.path}; Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("rate: stopped; python -m flux_lora.report SWEEP_DIR puts the ratings in the report")
    finally:
        server.server_close()
    return 0
