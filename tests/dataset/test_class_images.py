"""Class (regularization) images, issue 17 item 2: kohya's epoch plan, the checks against the subject's photos, and
the record. Real files: scikit-image photographs as class images, data/sample as the subject, the real analysis."""

from __future__ import annotations

import argparse
import shutil
import tomllib

import cv2
import pytest

from flux_lora.compose import PROJECT_ROOT
from flux_lora.dataset import AnalysisSettings, GateSettings, analyze_dataset
from flux_lora.dataset.regularization import check_class_images
from flux_lora.dataset.training_set import (
    CaptionError,
    TrainingExample,
    TrainingSet,
    training_set_from_report,
    with_class_images,
)
from flux_lora.engines.sd_scripts_dataset import build_dataset_view, view_subsets
from tests.class_images import write_class_images
from tests.engines.sd_scripts_standin import registered_images

SAMPLE = PROJECT_ROOT / "data" / "sample"
TRIGGER = "TOK Woman"


def _example(image: str, repeats: int, subset: str = "") -> TrainingExample:
    return TrainingExample(image, f"hash-{image}", "woman", "class tokens: no caption file", subset, repeats)


def _set(subject_repeats: list[int], class_repeats: list[int]) -> TrainingSet:
    return TrainingSet(
        root="/subject",
        examples=[_example(f"s{i}.png", r) for i, r in enumerate(subject_repeats)],
        reg_root="/classes",
        regularization=[_example(f"c{i}.png", r) for i, r in enumerate(class_repeats)],
    )


@pytest.mark.parametrize(
    ("subject", "classes", "per_epoch"),
    [
        ([1] * 7, [1, 1, 1, 1], [2, 2, 2, 1]),  # fewer class images than places: one more repeat each in turn
        ([1, 1], [1] * 5, [1, 1, 0, 0, 0]),  # more: the first ones fill the places, the rest never train
        ([5], [3, 3, 3], [3, 3, 0]),  # a repeat block is registered whole and may overshoot (kohya's loop)
        ([9], [2, 2], [5, 4]),  # subject repeats count as places
    ],
)
def test_epoch_plan_gives_the_class_images_the_subjects_places(tmp_path, subject, classes, per_epoch):
    training_set = _set(subject, classes)
    assert [n for _, n in training_set.reg_epoch_plan()] == per_epoch
    # The sd-scripts stand-in counts what DreamBoothDataset registers from the folders the view gives it (its own
    # implementation of kohya's loop, tests/engines/sd_scripts_standin.py): both must agree on every image.
    for e in [*training_set.examples, *training_set.regularization]:
        root = tmp_path / ("subject" if e in training_set.examples else "classes")
        root.mkdir(exist_ok=True)
        shutil.copy(SAMPLE / "01_full_frame.jpg", root / e.image)
    training_set = TrainingSet(
        str(tmp_path / "subject"),
        training_set.examples,
        reg_root=str(tmp_path / "classes"),
        regularization=training_set.regularization,
    )
    view = build_dataset_view(training_set, tmp_path / "cache", ".txt")
    toml = tmp_path / "dataset.toml"
    subsets = "".join(
        f'[[datasets.subsets]]\nimage_dir = "{folder}"\nnum_repeats = {repeats}\nis_reg = {str(is_reg).lower()}\n'
        for folder, repeats, is_reg in view_subsets(view, training_set)
    )
    toml.write_text("[[datasets]]\n" + subsets)
    assert tomllib.loads(toml.read_text())["datasets"][0]["subsets"][-1]["is_reg"] is True
    _, registered, _ = registered_images(argparse.Namespace(dataset_config=str(toml)))
    assert {path.name: n for path, n in registered.items()} == {
        e.image: n for e, n in training_set.reg_epoch_plan() if n
    }


def test_class_images_change_the_content_hash_and_a_set_without_them_keeps_its_own():
    plain = TrainingSet(root="/subject", examples=[_example("s0.png", 1)])
    with_classes = _set([1], [1])
    assert plain.content_hash != with_classes.content_hash
    assert "regularization" not in plain.to_dict()  # the record of a run without class images is what it was
    assert TrainingSet.from_dict(with_classes.to_dict()) == with_classes
    assert with_classes.to_dict()["regularization"][0]["per_epoch"] == 1


def _settings(trigger: str) -> AnalysisSettings:
    return AnalysisSettings(
        resolution=256, trigger=trigger, bucket_reso_steps=32, min_bucket_reso=128, max_bucket_reso=1024
    )


def test_class_images_are_checked_like_the_subjects_and_against_them(tmp_path):
    classes = write_class_images(tmp_path / "classes")
    # A subject photo among the class images, resized and re-encoded (as a copy made for another tool would be), and
    # a class caption that names the subject's trigger.
    subject_photo = cv2.imread(str(SAMPLE / "03_close_up.jpg"))
    cv2.imwrite(str(classes / "portrait.jpg"), cv2.resize(subject_photo, (300, 300)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    (classes / "class_1.txt").write_text(f"{TRIGGER}, a woman at a desk", encoding="utf-8")
    subject_report = analyze_dataset(SAMPLE, _settings(TRIGGER))
    class_report = analyze_dataset(classes, _settings(""))
    checked = check_class_images(class_report, subject_report, GateSettings(), TRIGGER, "woman")
    assert not checked.gate.passed
    (copy_line,) = [p for p in checked.gate.problems if "copy a subject photo" in p]
    assert "portrait.jpg = 03_close_up.jpg" in copy_line
    (trigger_line,) = [p for p in checked.gate.problems if "name the trigger" in p]
    assert "class_1.jpg" in trigger_line and "class_0.jpg" not in trigger_line
    assert any("without a caption train as the class tokens 'woman'" in i for i in checked.infos)
    assert not any("class_" in p for p in checked.gate.problems if "copy" in p)  # the other photos are not the subject

    subject = training_set_from_report(subject_report, ".txt", "woman", 1, validation_split=None)
    trained = with_class_images(subject, class_report, ".txt", "woman", 1, checked.copies_of_subject())
    assert sorted(e.image for e in trained.regularization) == [
        "class_0.jpg",
        "class_1.jpg",
        "class_2.jpg",
        "class_3.jpg",
    ]
    assert {
        "path": "portrait.jpg",
        "reason": "copy of subject photo 03_close_up.jpg",
        "set": "regularization",
    } in trained.excluded
    captions = {e.image: e.caption for e in trained.regularization}
    assert captions["class_0.jpg"] == "a photo of a woman" and captions["class_2.jpg"] == "woman"
    assert trained.reg_image_path(trained.regularization[0]).is_file()
    # enforce=false: every problem is a warning, and the copy still never trains
    relaxed = check_class_images(class_report, subject_report, GateSettings(enforce=False), TRIGGER, "woman")
    assert (
        relaxed.gate.passed
        and not relaxed.gate.problems
        and any("copy a subject photo" in w for w in relaxed.gate.warnings)
    )


def test_a_class_caption_that_is_not_utf8_is_refused_with_its_file(tmp_path):
    classes = write_class_images(tmp_path / "classes")
    (classes / "class_2.txt").write_bytes("a woman".encode("utf-16"))
    subject = training_set_from_report(analyze_dataset(SAMPLE, _settings(TRIGGER)), ".txt", "woman", 1)
    with pytest.raises(CaptionError, match="class_2.txt: caption is not UTF-8"):
        with_class_images(subject, analyze_dataset(classes, _settings("")), ".txt", "woman", 1, {})
