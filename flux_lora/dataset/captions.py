"""Caption checks: presence, encoding, trigger placement, length against the text encoders, repetition, leakage."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flux_lora.dataset.grouping import connected_groups

CLIP_MAX_TOKENS = 77  # includes the start and end tokens
T5_MAX_TOKENS = 512  # FLUX.1-dev's T5 sequence length
NEAR_IDENTICAL_JACCARD = 0.8  # word-set overlap above which two captions teach the same thing
LEAKAGE_MIN_SHARE = 0.5  # a content word in more than half the captions is probably in more than half the photos
LEAKAGE_MIN_CAPTIONS = 4
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_CLIP_PIECES = re.compile(r"[^\W\d_]+|\d|[^\w\s]", re.UNICODE)
# Words that say nothing about what is in the photo, so their frequency is no leakage signal.
_NON_CONTENT_WORDS = frozenset(
    """a an the and or of in on at to for with without from by as is are be being was were this that these those
    her his its their she he they them it one two some very while into onto over under near next behind front
    photo photograph picture image portrait shot close closeup up view looking looks face woman man person
    wearing wears standing sitting smiling""".split()
)


@dataclass
class CaptionRecord:
    path: str | None  # relative to the dataset folder; None when there is no caption file
    text: str | None
    clip_tokens: int | None = None  # estimates; see estimate_clip_tokens
    t5_tokens: int | None = None
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_clip_tokens(text: str) -> int:
    """CLIP BPE tokens, estimated: common words are one token, long words split about every 6 characters."""
    pieces = _CLIP_PIECES.findall(text.lower())
    return 2 + sum(max(1, math.ceil(len(piece) / 6)) for piece in pieces)


def estimate_t5_tokens(text: str) -> int:
    """T5 SentencePiece tokens, estimated the same way with shorter pieces; errs on the long side."""
    pieces = _CLIP_PIECES.findall(text)
    return 1 + sum(max(1, math.ceil(len(piece) / 5)) for piece in pieces)


# C0 and C1 control characters but tab and newline (and the CR of Windows line ends), and DEL: ESC starts the
# sequences that recolour, retitle or rewrite a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


def escape_control_characters(text: str) -> str:
    """The text with each control character written out (`\\x1b`), as `dataset prepare` writes its clean copy."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)")


def contains_trigger(text: str, trigger: str) -> bool:
    return _trigger_pattern(trigger).search(text) is not None


def read_caption(caption_path: Path, relative: str, trigger: str) -> CaptionRecord:
    """Read one caption file (or note its absence) and flag what would hurt training."""
    if not caption_path.is_file():
        return CaptionRecord(path=None, text=None, flags=["caption_missing"])
    raw = caption_path.read_bytes()
    record = CaptionRecord(path=relative, text=None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        record.flags.append("caption_not_utf8")
        return record
    if text.startswith("\ufeff"):
        record.flags.append("caption_bom")
    if has_control_characters(text):
        # Kept escaped from here on: a caption file must never reach the terminal as escape sequences.
        record.flags.append("caption_control_chars")
        text = escape_control_characters(text)
    record.text = text.strip()
    if not record.text:
        record.flags.append("caption_empty")
        return record
    record.clip_tokens = estimate_clip_tokens(record.text)
    record.t5_tokens = estimate_t5_tokens(record.text)
    if trigger:
        match = _trigger_pattern(trigger).search(text)
        if match is None:
            record.flags.append("trigger_missing")
        elif text[: match.start()].strip():
            record.flags.append("trigger_not_first")
    if record.clip_tokens > CLIP_MAX_TOKENS:
        record.flags.append("caption_too_long_clip")
    if record.t5_tokens > T5_MAX_TOKENS:
        record.flags.append("caption_too_long_t5")
    return record


def _normalised(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _content_words(text: str, trigger: str) -> set[str]:
    trigger_words = set(_WORD.findall(trigger.lower()))
    return {word for word in _WORD.findall(text.lower()) if word not in trigger_words}


def repeated_caption_groups(texts: list[str | None], trigger: str) -> tuple[list[list[int]], list[list[int]]]:
    """(identical groups, near-identical groups) as index lists; near-identical excludes pairs already identical."""
    present = [i for i, text in enumerate(texts) if text]
    normalised = {i: _normalised(texts[i]) for i in present}
    by_text: dict[str, list[int]] = {}
    for i in present:
        by_text.setdefault(normalised[i], []).append(i)
    identical = sorted((group for group in by_text.values() if len(group) > 1), key=lambda group: group[0])
    words = {i: _content_words(texts[i], trigger) for i in present}
    near_pairs = []
    for a_pos, a in enumerate(present):
        for b in present[a_pos + 1 :]:
            if normalised[a] == normalised[b]:
                continue
            union = words[a] | words[b]
            if union and len(words[a] & words[b]) / len(union) >= NEAR_IDENTICAL_JACCARD:
                near_pairs.append((a, b))
    return identical, connected_groups(len(texts), near_pairs)


def leakage_hints(texts: list[str | None], trigger: str) -> list[dict]:
    """Content words in most captions: a garment or background in most photos becomes part of the identity."""
    present = [text for text in texts if text]
    if len(present) < LEAKAGE_MIN_CAPTIONS:
        return []
    counts = Counter(word for text in present for word in _content_words(text, trigger))
    hints = [
        {"word": word, "captions": count, "share": round(count / len(present), 2)}
        for word, count in counts.items()
        if count / len(present) > LEAKAGE_MIN_SHARE and len(word) > 2 and word not in _NON_CONTENT_WORDS
    ]
    return sorted(hints, key=lambda hint: (-hint["captions"], hint["word"]))
