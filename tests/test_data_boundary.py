"""Issue 24, item 4: data read the same way everywhere (one decode path) and checked at the boundary.

Each refusal is reproduced through recipes/finetune.py's ``main`` as the recipe runs it (``run_recipe``: one
``error:`` line, exit status 2, no traceback), on ImageFolders built in code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _builders import CLASSES, load_script, save_tiny_clip, tiny_image_processor, write_imagefolder
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageOps
from transformers import pipeline

from hf_cfft.cli.script_args import DataArguments, load_train_and_eval_splits, run_recipe
from hf_cfft.data import CounterfactualTransform
from hf_cfft.dataset_checks import subset
from hf_cfft.images import load_image, preprocess_images

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str = "finetune"):
    return load_script(ROOT / "recipes" / f"{name}.py", f"{name}_recipe_boundary")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("boundary") / "clip")


def _refused(capsys, argv: list[str], recipe: str = "finetune") -> str:
    """Run the recipe's main as ``python recipes/<recipe>.py`` does; return stderr, asserting one handled error."""
    module = _recipe(recipe)
    with pytest.raises(SystemExit) as stop:
        run_recipe(lambda: module.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    err = err[err.index("error: ") :]  # what precedes it is datasets' progress bars
    return " ".join(err.split())  # messages wrap nowhere, but paths may be long: compare on one line


def _finetune_args(clip, images, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--output_dir", str(out), "--max_steps",
        "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--save_strategy",
        "no", *extra,
    ]  # fmt: skip


def _oriented_png(path: Path) -> Image.Image:
    """A PNG whose pixels are stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    rng = np.random.default_rng(3)
    stored = Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8))  # 32 wide, 48 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return ImageOps.exif_transpose(Image.open(path))


# ---- one decode path ----


def test_exif_orientation_is_applied_in_training_evaluation_and_the_pipeline(tiny_classifier, tmp_path):
    path = tmp_path / "sideways.png"
    upright = _oriented_png(path)
    assert upright.size == (48, 32)
    processor = tiny_image_processor()
    expected = processor(images=upright.convert("RGB"), return_tensors="pt")["pixel_values"]
    sideways = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert not torch.equal(expected, sideways)

    features = Features({"image": ImageFeature(decode=False), "label": ClassLabel(names=list(CLASSES))})
    raw = Dataset.from_dict({"image": [{"path": str(path), "bytes": None}], "label": [0]}, features=features)
    # training: undecoded rows through the train transform (before: EXIF skipped here only)
    train = raw.with_transform(CounterfactualTransform(processor, grid=(4, 4)))
    torch.testing.assert_close(torch.as_tensor(train[0]["pixel_values"])[None], expected, rtol=0, atol=0)
    # evaluation: the rows as datasets decodes them
    decoded = raw.cast_column("image", ImageFeature())
    torch.testing.assert_close(preprocess_images(processor, [decoded[0]["image"]]), expected, rtol=0, atol=0)
    # the pipeline of a saved classifier, given the file
    tiny_classifier.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    predictions = pipeline("image-classification", model=str(tmp_path / "model"))(str(path))
    with torch.no_grad():
        probs = tiny_classifier(pixel_values=expected).logits.softmax(-1)[0]
    for p in predictions:
        assert p["score"] == pytest.approx(probs[tiny_classifier.config.label2id[p["label"]]].item(), abs=1e-5)


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for item in ({"path": str(tmp_path / "g16.png"), "bytes": None}, Image.open(tmp_path / "g16.png")):
        rgb = np.asarray(load_image(item))
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[..., 0], np.round(levels / 257.0).astype(np.uint8))
        assert (rgb == 255).mean() < 0.01  # before: 99.6 % of the pixels became 255


# ---- --max_train_samples / --max_eval_samples ----


def test_max_samples_take_a_seeded_sample_spread_over_the_classes(tmp_path):
    images = write_imagefolder(tmp_path / "images", splits=("train", "test"), per_class=6)
    data_args = DataArguments(dataset_name=str(images), eval_splits=["test"], max_train_samples=6, max_eval_samples=3)
    train, splits = load_train_and_eval_splits(data_args, seed=0)
    assert sorted(train["label"]) == [0, 0, 1, 1, 2, 2]  # before: the first 6 rows, all of class 0
    assert sorted(splits["test"]["label"]) == [0, 1, 2]
    again, _ = load_train_and_eval_splits(data_args, seed=0)
    other, _ = load_train_and_eval_splits(data_args, seed=1)
    paths = [row["path"] for row in train.cast_column("image", ImageFeature(decode=False))["image"]]
    assert paths == [row["path"] for row in again.cast_column("image", ImageFeature(decode=False))["image"]]
    assert paths != [row["path"] for row in other.cast_column("image", ImageFeature(decode=False))["image"]]
    unlabelled = Dataset.from_dict({"x": list(range(10))})
    assert len(subset(unlabelled, 4, seed=0)) == 4 and subset(unlabelled, 4, seed=0)["x"] != [0, 1, 2, 3]


@pytest.mark.parametrize("value", ["-3", "0"])
def test_max_train_samples_that_is_not_positive_is_refused(clip, tmp_path, capsys, value):
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=2)
    err = _refused(capsys, _finetune_args(clip, images, tmp_path / "run", "--max_train_samples", value))
    assert f"--max_train_samples {value} must be a positive number of images" in err and "drop the flag" in err
    assert not (tmp_path / "run").exists()


# ---- ImageFolder layouts ----


def _image(path: Path, colour=(120, 30, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), colour).save(path)


def _nested(root: Path) -> None:
    for name in ("cat", "dog"):
        for n in range(2):
            _image(root / "train" / "animals" / name / f"{n}.png")


def _no_class_folders(root: Path) -> None:
    for n in range(3):
        _image(root / "train" / f"{n}.png")


def _one_class(root: Path) -> None:
    for n in range(3):
        _image(root / "train" / "cat" / f"{n}.png")


def _empty_split(root: Path) -> None:
    (root / "train").mkdir(parents=True)


def _case(root: Path) -> None:
    for name in ("Cat", "cat", "dog"):
        _image(root / "train" / name / "0.png")


LAYOUTS = {
    "nested": (_nested, "class folder {root}/train/animals holds folders (cat, dog) instead of only images"),
    "no class folders": (_no_class_folders, "split folder {root}/train has no class folders: its 3 image(s)"),
    "one class": (_one_class, "{root} has one class only ('cat', 3 images in train): a classifier needs two"),
    "empty split": (_empty_split, "split folder {root}/train is empty: no class folders and no images"),
    "case": (_case, "class folders 'Cat' and 'cat' in {root}/train differ only by case"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_imagefolder_that_is_not_split_class_image_is_refused_naming_it(clip, tmp_path, capsys, layout):
    build, message = LAYOUTS[layout]
    root = tmp_path / "images"
    build(root)
    err = _refused(capsys, _finetune_args(clip, root, tmp_path / "run"))
    assert message.format(root=root) in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "names, message",
    [
        ("cat\ndog\n", "has 2 names (cat, dog) but the dataset has 3 classes (cat, dog, fox)"),
        ("dog\ncat\nfox\n", "lists the dataset's classes in another order (line 1 is 'dog', but class 0 of the"),
        # Before: accepted (rc 0), the dog images scored against a second 'cat' prompt.
        ("cat\ncat\nfox\n", "names class 0's folder 'cat' in the place of another class (line 2 is 'cat', but"),
    ],
    ids=["count", "order", "another class's name"],
)
def test_a_class_names_file_that_does_not_match_the_folders_is_refused(clip, tmp_path, capsys, names, message):
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=2)
    (tmp_path / "names.txt").write_text(names)
    names_file = str(tmp_path / "names.txt")
    err = _refused(capsys, _finetune_args(clip, images, tmp_path / "run", "--class_names", names_file))
    assert message in err


def test_readable_names_for_folders_named_otherwise_are_accepted(tmp_path):
    from hf_cfft.cli.sources import class_names_for

    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=1)
    (tmp_path / "names.txt").write_text("a cat\na dog\na fox\n")
    data_args = DataArguments(dataset_name=str(images))
    train, _ = load_train_and_eval_splits(data_args, seed=0)
    assert class_names_for(str(tmp_path / "names.txt"), train) == ["a cat", "a dog", "a fox"]


def _with_metadata(root: Path, rows: dict[str, list]) -> None:
    for split, labels in rows.items():
        lines = ["file_name,species,label"]
        for n, label in enumerate(labels):
            _image(root / split / f"{n}.png", colour=(40 * n, 90, 30))
            lines.append(f"{n}.png,{CLASSES[label % 3]},{label}")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_string_labels_are_refused_with_how_to_make_them_classes(clip, tmp_path, capsys):
    _with_metadata(tmp_path / "images", {"train": [0, 1, 2, 0]})
    args = _finetune_args(clip, tmp_path / "images", tmp_path / "run", "--label_column", "species")
    err = _refused(capsys, args)
    assert "--label_column 'species' of split 'train' holds strings ('cat', 'dog', 'fox', ...)" in err
    assert "class_encode_column('species')" in err


def test_a_wrong_label_column_is_named_with_the_columns_there_are(clip, tmp_path, capsys):
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=2)
    err = _refused(capsys, _finetune_args(clip, images, tmp_path / "run", "--label_column", "labels"))
    assert "--label_column 'labels' is not a column of split 'train' (did you mean 'label'?)" in err
    assert "its columns are image, label" in err


def test_hidden_eval_labels_are_refused_before_training(clip, tmp_path, capsys):
    _with_metadata(tmp_path / "images", {"train": [0, 1, 2, 0, 1, 2], "test": [0, 1, -1]})
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    args = _finetune_args(
        clip, tmp_path / "images", tmp_path / "run", "--class_names", str(tmp_path / "names.txt"), "--eval_splits",
        "test", "--templates", "simple",
    )  # fmt: skip
    err = _refused(capsys, args)
    assert "split 'test' has label -1: -1 marks an image without a label" in err
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("bad", [-1, 3])
def test_eval_labels_outside_the_head_are_refused_before_scoring(clip, tmp_path, capsys, bad):
    _with_metadata(tmp_path / "images", {"test": [0, 1, bad]})
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    args = [
        "--model_name_or_path", str(clip), "--dataset_name", str(tmp_path / "images"), "--class_names",
        str(tmp_path / "names.txt"), "--eval_splits", "test", "--output_dir", str(tmp_path / "zs"), "--device", "cpu",
    ]  # fmt: skip
    err = _refused(capsys, args, recipe="zero_shot")
    assert f"split 'test' has label(s) {bad} outside the model's classes 0..2, so its accuracy would be wrong" in err
    if bad == -1:
        assert "-1 marks an image without a label" in err
    assert not (tmp_path / "zs" / "results.json").exists()


def test_integer_labels_of_an_eval_split_are_checked_by_the_library_too(tiny_classifier):
    from hf_cfft.evaluation import evaluate_splits

    rng = np.random.default_rng(0)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    split = Dataset.from_dict({"image": images, "label": [0, -1]}, features=features)
    with pytest.raises(ValueError, match=r"split 'hidden' has label\(s\) -1 outside the model's classes 0\.\.2"):
        evaluate_splits(tiny_classifier, {"hidden": split}, tiny_image_processor())


def test_hidden_folders_and_files_are_let_be_as_the_builder_skips_them(tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        _image(root / "train" / name / "0.png")
    _image(root / "train" / ".ipynb_checkpoints" / "x.png")  # a notebook's folder beside the classes
    _image(root / "train" / "cat" / ".ipynb_checkpoints" / "y.png")  # and inside one
    _image(root / "train" / "cat" / "._0.png")  # a macOS resource fork
    train, _ = load_train_and_eval_splits(DataArguments(dataset_name=str(root)), seed=0)
    assert train.features["label"].names == ["cat", "dog"] and len(train) == 2


def test_the_train_split_scored_as_an_eval_split_is_refused(clip, tmp_path, capsys):
    """Before: rc 0, the split popped from the eval splits when training took it, its column shown as '-'."""
    images = write_imagefolder(tmp_path / "images", splits=("train", "test"), per_class=2)
    argv = _finetune_args(clip, images, tmp_path / "run", "--train_split", "test", "--eval_splits", "test", "train")
    err = _refused(capsys, argv)
    assert "--train_split 'test' is also in --eval_splits ['test', 'train']: its accuracy would be measured" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_split_named_twice_is_refused(clip, tmp_path, capsys):
    """Before: an OOD split named twice counted twice in the OOD average, rc 0."""
    images = write_imagefolder(tmp_path / "images", splits=("train", "test", "ood"), per_class=2)
    argv = _finetune_args(clip, images, tmp_path / "run", "--eval_splits", "test", "ood", "--ood_splits", "ood", "ood")
    assert "--ood_splits names 'ood' more than once; name each split once" in _refused(capsys, argv)
