"""Blind ratings read back: `SWEEP_DIR/ratings.jsonl`, one line per click, appended by the rating page.

A rater who rates an image again changes their score (the later line wins). A run's score is the mean over
its rated images and raters, so the run (the seed) stays the unit of the cell statistics, as for every other
metric. Agreement between raters: Spearman's rank correlation over the images both rated, per pair.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATINGS_FILE = "ratings.jsonl"
SCORES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class RaterPair:
    a: str
    b: str
    images: int  # rated by both
    spearman: float | None  # None below 3 shared images or when one rater gave one score to all
    exact: float  # share of shared images with the same score
    within_one: float


@dataclass(frozen=True)
class RatingSummary:
    raters: list[str]
    images: int
    lines: int
    by_run: dict[str, float]  # run folder name -> mean score
    pairs: list[RaterPair]
    skipped_lines: int  # lines that were not valid ratings (a torn last line after a crash, say)


def read_ratings(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Valid rating lines in file order and how many lines were skipped."""
    ratings, skipped = [], 0
    if not path.is_file():
        return [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            if entry["score"] in SCORES and entry["rater"] and entry["image"] and entry["run"]:
                ratings.append(entry)
                continue
        except (ValueError, KeyError, TypeError):
            pass
        skipped += 1
    return ratings, skipped


def latest_scores(ratings: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(rater, image) -> that rater's last rating of that image."""
    return {(r["rater"], r["image"]): r for r in ratings}


def _spearman(x: list[int], y: list[int]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    value = float(spearmanr(x, y).statistic)
    return None if math.isnan(value) else value


def rater_pairs(latest: dict[tuple[str, str], dict[str, Any]]) -> list[RaterPair]:
    by_rater: dict[str, dict[str, int]] = {}
    for (rater, image), entry in latest.items():
        by_rater.setdefault(rater, {})[image] = entry["score"]
    pairs = []
    for a, b in itertools.combinations(sorted(by_rater), 2):
        shared = sorted(by_rater[a].keys() & by_rater[b].keys())
        if not shared:
            continue
        x, y = [by_rater[a][i] for i in shared], [by_rater[b][i] for i in shared]
        pairs.append(
            RaterPair(
                a,
                b,
                len(shared),
                _spearman(x, y),
                sum(p == q for p, q in zip(x, y)) / len(shared),
                sum(abs(p - q) <= 1 for p, q in zip(x, y)) / len(shared),
            )
        )
    return pairs


def summarize_ratings(sweep_dir: Path) -> RatingSummary | None:
    ratings, skipped = read_ratings(sweep_dir / RATINGS_FILE)
    if not ratings:
        return None
    latest = latest_scores(ratings)
    per_run: dict[str, list[int]] = {}
    for entry in latest.values():
        per_run.setdefault(entry["run"], []).append(entry["score"])
    return RatingSummary(
        raters=sorted({rater for rater, _ in latest}),
        images=len({image for _, image in latest}),
        lines=len(ratings),
        by_run={run: sum(scores) / len(scores) for run, scores in per_run.items()},
        pairs=rater_pairs(latest),
        skipped_lines=skipped,
    )
