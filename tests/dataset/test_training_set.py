"""One decision of which (image, caption) pairs train, read by the preflight, the fingerprint, the run id
and both engines (issue "Engine fidelity" item 13): real image files in tmp_path, real analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_lora.dataset import AnalysisSettings, analyze_dataset
from flux_lora.dataset.training_set import CaptionError, TrainingSet, training_set_from_folder, training_set_from_report
from flux_lora.engines.native.data import find_examples
from flux_lora.engines.sd_scripts_dataset import build_dataset_view
from tests.engines.native.native_tiny_run import tiny_config


def _photo(path: Path, seed: int, caption: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((96, 96, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption)


def kohya_layout(root: Path) -> Path:
    """A DreamBooth-style folder: images in the root, in `10_tok/`, one too deep, a macOS resource fork, UTF-8 accents."""
    _photo(root / "a.png", 0, b"TOK woman, root photo")
    _photo(root / "10_tok" / "b.png", 1, b"TOK woman, in a subset folder")
    _photo(root / "10_tok" / "c.png", 2, "TOK woman, café".encode())
    _photo(root / "plain" / "d.png", 3, None)  # no caption: class tokens
    _photo(root / "plain" / "deeper" / "e.png", 4, b"TOK woman, too deep")
    (root / "10_tok" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not an image")
    return root


def test_folder_selection_takes_subsets_skips_hidden_and_nested(tmp_path):
    selected = training_set_from_folder(kohya_layout(tmp_path / "ds"), ".txt", "woman", default_repeats=2)
    by_image = {e.image: e for e in selected.examples}
    assert sorted(by_image) == ["10_tok/b.png", "10_tok/c.png", "a.png", "plain/d.png"]
    assert (
        by_image["10_tok/b.png"].repeats == 10
        and by_image["a.png"].repeats == 2
        and by_image["plain/d.png"].repeats == 2
    )
    assert by_image["10_tok/c.png"].caption == "TOK woman, café" and by_image["10_tok/c.png"].caption_source == "file"
    assert by_image["plain/d.png"].caption == "woman"
    assert {"path": "plain/deeper/e.png", "reason": "more than one folder deep"} in selected.excluded
    assert list(selected.subsets()) == ["", "10_tok", "plain"]


def test_preflight_and_native_trainer_read_the_same_pairs(tmp_path):
    root = kohya_layout(tmp_path / "ds")
    report = analyze_dataset(
        root,
        AnalysisSettings(
            resolution=64,
            trigger="TOK woman",
            bucket_reso_steps=32,
            min_bucket_reso=64,
            max_bucket_reso=128,
            cache_dir=None,
        ),
    )
    assert report.nested_images == ["plain/deeper/e.png"]
    from_report = training_set_from_report(report, ".txt", "woman", 1)
    path = tmp_path / "training_set.json"
    from_report.write_json(path)
    examples = find_examples(tiny_config(tmp_path, root, training_set_file=str(path)))
    assert [(str(e.image), e.caption, e.repeats) for e in examples] == [
        (str(root / e.image), e.caption, e.repeats) for e in from_report.examples
    ]
    assert len(examples) == 4
    # Without a frozen list the trainer makes the same selection from the folder.
    assert [e.caption for e in find_examples(tiny_config(tmp_path, root))] == [e.caption for e in from_report.examples]


def test_training_set_hash_follows_captions_and_repeats(tmp_path):
    root = kohya_layout(tmp_path / "ds")
    first = training_set_from_folder(root, ".txt", "woman").content_hash
    (root / "a.txt").write_text("TOK woman, an edited caption", encoding="utf-8")
    edited = training_set_from_folder(root, ".txt", "woman").content_hash
    (root / "10_tok").rename(root / "5_tok")
    renamed = training_set_from_folder(root, ".txt", "woman").content_hash
    assert len({first, edited, renamed}) == 3


def test_unusable_image_does_not_train(tmp_path):
    root = kohya_layout(tmp_path / "ds")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    report = analyze_dataset(
        root,
        AnalysisSettings(
            resolution=64,
            trigger="TOK woman",
            bucket_reso_steps=32,
            min_bucket_reso=64,
            max_bucket_reso=128,
            cache_dir=None,
        ),
    )
    selected = training_set_from_report(report, ".txt", "woman", 1)
    assert "broken.jpg" not in {e.image for e in selected.examples}
    assert any(x["path"] == "broken.jpg" for x in selected.excluded)


def _photos(root: Path, count: int) -> Path:
    for index in range(count):
        _photo(root / f"p{index}.png", 10 + index, f"TOK woman, photo {index}".encode())
    return root


def test_validation_split_holds_out_the_same_images_by_content_whatever_their_names(tmp_path):
    root = _photos(tmp_path / "ds", 8)
    quarter = training_set_from_folder(root, ".txt", "woman", validation_split=0.25)
    assert len(quarter.validation) == 2 and len(quarter.examples) == 6
    assert not {e.image for e in quarter.validation} & {e.image for e in quarter.examples}
    held = {e.content_hash for e in quarter.validation}
    assert held == set(sorted(e.content_hash for e in training_set_from_folder(root, ".txt", "woman").examples)[:2])
    # Renamed and reordered: the same photos are held out.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for number, image in enumerate(sorted(root.glob("*.png"), reverse=True)):
        shutil.copy(image, renamed / f"z{number}.png")
        shutil.copy(image.with_suffix(".txt"), renamed / f"z{number}.txt")
    assert {
        e.content_hash for e in training_set_from_folder(renamed, ".txt", "woman", validation_split=0.25).validation
    } == held
    # A larger share holds out a superset; any share above 0 holds out at least one image.
    assert held < {
        e.content_hash for e in training_set_from_folder(root, ".txt", "woman", validation_split=0.5).validation
    }
    assert len(training_set_from_folder(root, ".txt", "woman", validation_split=0.01).validation) == 1


def test_the_held_out_choice_is_part_of_the_record_and_its_hash(tmp_path):
    root = _photos(tmp_path / "ds", 4)
    plain = training_set_from_folder(root, ".txt", "woman")
    split = training_set_from_folder(root, ".txt", "woman", validation_split=0.25)
    assert plain.content_hash != split.content_hash
    assert TrainingSet.from_dict(split.to_dict()) == split and split.to_dict()["n_validation"] == 1
    assert (
        TrainingSet.from_dict({k: v for k, v in plain.to_dict().items() if "validation" not in k}) == plain
    )  # older records


def test_neither_engine_reads_a_held_out_image(tmp_path):
    root = _photos(tmp_path / "ds", 4)
    split = training_set_from_folder(root, ".txt", "woman", validation_split=0.25)
    (held,) = [Path(e.image).name for e in split.validation]
    path = tmp_path / "training_set.json"
    split.write_json(path)
    native = find_examples(tiny_config(tmp_path, root, training_set_file=str(path)))
    view = build_dataset_view(split, tmp_path / "cache", ".txt")
    assert held not in {e.image.name for e in native} and len(native) == 3
    assert held not in {p.name for p in view.rglob("*.png")} and len(list(view.rglob("*.png"))) == 3


def test_a_validation_folder_is_held_out_and_its_images_never_train(tmp_path):
    root = _photos(tmp_path / "ds", 4)
    folder = tmp_path / "holdout"
    folder.mkdir()
    shutil.copy(root / "p0.png", folder / "same_photo.png")  # also in the training folder, under another name
    _photo(folder / "new.png", 99, b"TOK woman, a new photo")
    selected = training_set_from_folder(root, ".txt", "woman", validation_path=folder)
    assert sorted(Path(e.image).name for e in selected.validation) == ["new.png", "same_photo.png"]
    assert all(Path(e.image).is_absolute() and selected.image_path(e).is_file() for e in selected.validation)
    assert [e.image for e in selected.examples] == ["p1.png", "p2.png", "p3.png"]


def test_by_default_a_dataset_of_eight_photos_holds_one_out_and_a_resized_copy_of_it_does_not_train(tmp_path):
    """dataset.validation_split=null (the default): 10% of 8+ distinct photos, at least one, by content. A resized,
    re-encoded copy of the held-out photo under another name is a near-duplicate (real perceptual hashes) and is kept
    out of training too, with the reason recorded; below 8 photos nothing is held out."""
    import cv2

    from flux_lora.compose import PROJECT_ROOT

    root = Path(shutil.copytree(PROJECT_ROOT / "data" / "sample", tmp_path / "ds"))
    settings = AnalysisSettings(resolution=256, trigger="TOK Woman", detect_faces=False, cache_dir=tmp_path / "cache")
    plain = training_set_from_report(analyze_dataset(root, settings), ".txt", "woman", 1, validation_split=None)
    assert len(plain.validation) == 1 and len(plain.examples) == 7
    (held,) = plain.validation
    photo = cv2.imread(str(root / held.image))
    smaller = cv2.resize(photo, (photo.shape[1] * 3 // 4, photo.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "zz_resized_copy.jpg"), smaller, [cv2.IMWRITE_JPEG_QUALITY, 80])
    (root / "zz_resized_copy.txt").write_text("TOK Woman, the same photo again\n", encoding="utf-8")

    report = analyze_dataset(root, settings)
    with_copy = training_set_from_report(report, ".txt", "woman", 1, validation_split=None)
    assert [e.image for e in with_copy.validation] == [held.image]  # the same photo held out, by content
    assert "zz_resized_copy.jpg" not in {e.image for e in with_copy.examples}
    assert {"path": "zz_resized_copy.jpg", "reason": f"near-duplicate of held-out {held.image}"} in with_copy.excluded
    assert {e.image for e in with_copy.examples} == {e.image for e in plain.examples}

    for extra in root.glob("0[1-2]_*"):  # 6 photos left: below the automatic hold-out's 8
        extra.unlink()
    (root / "zz_resized_copy.jpg").unlink()
    small = training_set_from_report(analyze_dataset(root, settings), ".txt", "woman", 1, validation_split=None)
    assert small.validation == [] and len(small.examples) == 6


@pytest.mark.parametrize(
    "raw, what",
    [
        ("TOK woman, café".encode("utf-16"), "is not UTF-8 (byte 0xff at offset 0)"),
        ("TOK woman, café".encode("latin-1"), "is not UTF-8 (byte 0xe9 at offset 14)"),
        (b"TOK woman\x00, hidden", "holds a NUL byte at offset 9"),
    ],
)
def test_a_caption_that_is_not_utf8_text_is_refused_with_the_file_named(tmp_path, raw, what):
    root = tmp_path / "ds"
    _photo(root / "a.png", 0, b"TOK woman, fine")
    _photo(root / "b.png", 1, raw)
    with pytest.raises(CaptionError) as refused:
        training_set_from_folder(root, ".txt", "woman")
    assert str(refused.value).startswith(f"{root / 'b.txt'}: caption {what}; save it as UTF-8 text")
