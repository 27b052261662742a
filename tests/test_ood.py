"""OOD evaluation: ImageNet-shift class lists and protocols, label conventions of folders and Hub copies, size checks,
and the evaluate_ood recipe end to end on tiny on-disk fixtures (no network)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _builders import CLASSES, save_tiny_clip, tiny_clip, tiny_image_processor, write_imagefolder
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from hf_cfft import classifier_from_clip, load_class_names
from hf_cfft.evaluation import (
    Protocol,
    RunResult,
    evaluate_splits,
    imagenet_eval_sets,
    robustness_fit,
    shift_protocol,
    top1_accuracy,
)
from hf_cfft.evaluation.imagenet_shifts import (
    SHIFTS,
    IncompleteShiftError,
    imagenet_a_indices,
    imagenet_r_indices,
    imagenet_wnids,
    load_shift_folder,
    objectnet_classes,
    shift_from_dataset,
)
from hf_cfft.evaluation.protocols import BorderCrop
from hf_cfft.modeling import ClipCfftConfig, ClipCfftForImageClassification

ROOT = Path(__file__).resolve().parents[1]
WNIDS = imagenet_wnids()


def _recipe():
    spec = importlib.util.spec_from_file_location("evaluate_ood_recipe", ROOT / "recipes" / "evaluate_ood.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through the module
    spec.loader.exec_module(module)
    return module


def _images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (20, 24)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{n}.png")


def _pil(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (10 * i % 255, 0, 0)) for i in range(n)]


def _object(name: str):
    return next(c for c in objectnet_classes() if c.name == name)


# --- class lists ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices", [imagenet_r_indices(), imagenet_a_indices()], ids=["imagenet_r", "imagenet_a"])
def test_r_and_a_use_200_unique_imagenet_classes_in_folder_order(indices):
    assert len(indices) == 200 and len(set(indices)) == 200
    assert all(0 <= i < 1000 for i in indices)
    # Local label k of an ImageFolder over the 200 sorted wnid folders is class indices[k].
    assert list(indices) == sorted(indices)
    assert sorted(WNIDS[i] for i in indices) == [WNIDS[i] for i in indices]


def test_imagenet_wnids_are_the_1000_sorted_synsets():
    assert len(WNIDS) == 1000 and len(set(WNIDS)) == 1000 and list(WNIDS) == sorted(WNIDS)
    assert (WNIDS[0], WNIDS[1], WNIDS[999]) == ("n01440764", "n01443537", "n15075141")


def test_objectnet_maps_113_classes_to_imagenet_indices():
    classes = objectnet_classes()
    assert len(classes) == 113
    assert len({c.folder for c in classes}) == 113 and [c.folder for c in classes] == sorted(c.folder for c in classes)
    mapped = [i for c in classes for i in c.imagenet_indices]
    assert all(0 <= i < 1000 for i in mapped) and len(mapped) == len(set(mapped)) == 125
    assert _object("Alarm clock").imagenet_indices == (409, 530)  # analog clock, digital clock
    names = load_class_names("imagenet")
    assert [names[i] for i in _object("Chair").imagenet_indices] == ["barber chair", "folding chair", "rocking chair"]


def test_published_sizes():
    sizes = {key: spec.size for key, spec in SHIFTS.items()}
    assert sizes == {
        "imagenet": 50000,
        "imagenet_v2": 10000,
        "imagenet_r": 30000,
        "imagenet_sketch": 50889,
        "imagenet_a": 7500,
        "objectnet": 18574,
    }


# --- protocols -----------------------------------------------------------------------------------------------------


def test_restricting_to_the_200_classes_picks_the_best_logit_among_them():
    r = imagenet_r_indices()
    assert 0 not in r and 1 in r
    logits = np.zeros((2, 1000), dtype=np.float32)
    logits[0, 0], logits[0, 1], logits[0, r[5]] = 9.0, 4.0, 3.0  # class 0 is not in ImageNet-R
    logits[1, r[7]], logits[1, r[8]] = 2.0, 1.0
    labels = np.array([1, r[7]])
    protocol = shift_protocol("imagenet_r")

    assert protocol.predict(logits).tolist() == [1, r[7]]
    assert protocol.predict(logits, restrict=False).tolist() == [0, r[7]]
    assert top1_accuracy(protocol.predict(logits), labels) == 100.0
    assert top1_accuracy(protocol.predict(logits, restrict=False), labels) == 50.0


def test_objectnet_scores_each_class_by_the_max_of_its_imagenet_logits():
    classes = objectnet_classes()
    chair = next(i for i, c in enumerate(classes) if c.name == "Chair")
    backpack = next(i for i, c in enumerate(classes) if c.name == "Backpack")
    clock = next(i for i, c in enumerate(classes) if c.name == "Alarm clock")
    logits = np.zeros((2, 1000), dtype=np.float32)
    barber, folding, rocking = _object("Chair").imagenet_indices
    # Row 0: one chair column beats the backpack, though the chair columns' mean does not; an unmapped class is top.
    logits[0, [barber, folding, rocking]] = [-6.0, -6.0, 4.0]
    logits[0, _object("Backpack").imagenet_indices[0]] = 3.0
    logits[0, 0] = 10.0
    # Row 1: the second ImageNet class of a multi-mapped ObjectNet class wins.
    logits[1, 530] = 5.0
    protocol = shift_protocol("objectnet")

    assert protocol.predict(logits).tolist() == [chair, clock]
    assert protocol.predict(logits, restrict=False).tolist() == [-1, clock]
    assert backpack != chair


def test_protocol_refuses_a_head_of_the_wrong_width():
    with pytest.raises(ValueError, match="1000"):
        shift_protocol("imagenet_a").predict(np.zeros((1, 3)))
    three_classes = classifier_from_clip(tiny_clip(), torch.zeros(3, 16), list(CLASSES))
    hub = Dataset.from_dict({"image": _pil(1), "label": [6]})
    sets = imagenet_eval_sets({"imagenet_a": hub}, allow_partial=True, label_kind="imagenet")
    with pytest.raises(ValueError, match="scores 3 classes"):
        evaluate_splits(three_classes, sets, tiny_image_processor())
    assert Protocol().predict(np.array([[0.0, 2.0, 1.0]])).tolist() == [1]


def test_objectnet_border_crop_removes_two_pixels_per_side():
    sets = imagenet_eval_sets(
        {"objectnet": Dataset.from_dict({"image": _pil(1), "label": ["alarm_clock"]})}, allow_partial=True
    )
    assert isinstance(sets[0].image_transform, BorderCrop)
    assert sets[0].image_transform(Image.new("RGB", (30, 20))).size == (26, 16)


# --- folders -------------------------------------------------------------------------------------------------------


def test_v2_labels_are_the_integer_folder_names_not_their_sorted_order(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for name in ("0", "1", "10", "2", "999"):
        _images(root / name, 2)
    dataset = load_shift_folder("imagenet_v2", str(tmp_path), allow_partial=True)  # a data root works too

    rows = dataset.cast_column("image", ImageFeature(decode=False))
    pairs = {(Path(row["image"]["path"]).parent.name, row["label"]) for row in rows}
    assert pairs == {("0", 0), ("1", 1), ("10", 10), ("2", 2), ("999", 999)}
    assert len(dataset) == 10


def test_v2_folder_outside_0_999_is_refused(tmp_path):
    _images(tmp_path / "1000", 1)
    with pytest.raises(ValueError, match="1000"):
        load_shift_folder("imagenet_v2", str(tmp_path), allow_partial=True)


def test_r_folder_labels_are_imagenet_indices_and_foreign_wnids_are_refused(tmp_path):
    r = imagenet_r_indices()
    for k in (0, 3):
        _images(tmp_path / "imagenet-r" / WNIDS[r[k]], 2)
    dataset = load_shift_folder("imagenet_r", str(tmp_path), allow_partial=True)
    assert sorted(set(dataset["label"])) == [r[0], r[3]]

    _images(tmp_path / "imagenet-r" / WNIDS[0], 1)  # tench is not an ImageNet-R class
    with pytest.raises(ValueError, match=WNIDS[0]):
        load_shift_folder("imagenet_r", str(tmp_path), allow_partial=True)


def test_objectnet_folders_outside_the_mapped_classes_are_not_scored(tmp_path):
    images = tmp_path / "objectnet-1.0" / "images"
    _images(images / "chair", 2)
    _images(images / "squeegee", 3)  # an ObjectNet class with no ImageNet counterpart
    dataset = load_shift_folder("objectnet", str(tmp_path), allow_partial=True)
    chair = next(i for i, c in enumerate(objectnet_classes()) if c.folder == "chair")
    assert dataset["label"] == [chair, chair]


def test_a_short_set_is_reported_not_scored_unless_partial_is_allowed(tmp_path):
    _images(tmp_path / "imagenet-r" / WNIDS[imagenet_r_indices()[0]], 3)
    with pytest.raises(IncompleteShiftError) as error:
        load_shift_folder("imagenet_r", str(tmp_path))
    message = str(error.value)
    assert "ImageNet-R" in message and " 3 images" in message and "30000" in message and "allow_partial" in message
    assert len(load_shift_folder("imagenet_r", str(tmp_path), allow_partial=True)) == 3


# --- Hub-style datasets --------------------------------------------------------------------------------------------


def test_hub_labels_local_to_the_200_classes_map_to_the_1000_way_head():
    r = imagenet_r_indices()
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=200)})
    hub = Dataset.from_dict({"image": _pil(3), "label": [0, 5, 199]}, features=features)
    assert shift_from_dataset("imagenet_r", hub, allow_partial=True)["label"] == [r[0], r[5], r[199]]

    plain = Dataset.from_dict({"image": _pil(2), "label": [0, 199]})  # plain ints: ambiguous until told
    with pytest.raises(ValueError, match="label_kind"):
        shift_from_dataset("imagenet_r", plain, allow_partial=True)
    mapped = shift_from_dataset("imagenet_r", plain, label_kind="local", allow_partial=True)
    assert mapped["label"] == [r[0], r[199]] and mapped.column_names == ["image", "label"]


def test_hub_dataset_with_only_wnids_maps_through_them():
    a = imagenet_a_indices()
    strings = Dataset.from_dict({"img": _pil(2), "wnid": [WNIDS[a[4]], WNIDS[a[0]]], "class_name": ["x", "y"]})
    strings = strings.cast_column("img", ImageFeature())
    out = shift_from_dataset("imagenet_a", strings, allow_partial=True)
    assert out["label"] == [a[4], a[0]] and out.column_names == ["image", "label"]

    # A ClassLabel whose names are the wnids (an ImageFolder pushed to the Hub).
    names = [WNIDS[i] for i in a]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    folder_like = Dataset.from_dict({"image": _pil(2), "label": [1, 2]}, features=features)
    assert shift_from_dataset("imagenet_a", folder_like, allow_partial=True)["label"] == [a[1], a[2]]

    with pytest.raises(ValueError, match=WNIDS[0]):  # not an ImageNet-A class
        shift_from_dataset("imagenet_a", strings.add_column("w", [WNIDS[0]] * 2), label_column="w", allow_partial=True)


def test_hub_objectnet_drops_unmapped_classes_and_checks_the_size():
    hub = Dataset.from_dict({"image": _pil(3), "label": ["Alarm clock", "Squeegee", "t-shirt"]})
    out = shift_from_dataset("objectnet", hub, allow_partial=True)
    folders = [c.folder for c in objectnet_classes()]
    assert out["label"] == [folders.index("alarm_clock"), folders.index("t-shirt")]
    with pytest.raises(IncompleteShiftError, match="ObjectNet.* 2 images.*18574"):
        shift_from_dataset("objectnet", hub)


def test_hub_sets_of_1000_classes_take_int_labels_as_imagenet_indices():
    hub = Dataset.from_dict({"image": _pil(2), "label": [7, 999]}, features=None)
    assert shift_from_dataset("imagenet_sketch", hub, allow_partial=True)["label"] == [7, 999]
    unlabelled = Dataset.from_dict({"image": _pil(1), "label": [-1]})
    with pytest.raises(ValueError, match="-1"):
        shift_from_dataset("imagenet", unlabelled, allow_partial=True)


def test_hub_id_names_its_split_or_must_have_only_one(monkeypatch):
    import datasets

    a = imagenet_a_indices()
    loaded = []

    def fake_load(hub_id, config=None, *, split=None, cache_dir=None):
        loaded.append((hub_id, split))
        return Dataset.from_dict({"image": _pil(1), "wnid": [WNIDS[a[0]]]}).cast_column("image", ImageFeature())

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda hub_id, config=None: ["train", "test"])
    sets = imagenet_eval_sets({"imagenet_a": "someone/imagenet-a:test"}, allow_partial=True)
    assert loaded == [("someone/imagenet-a", "test")] and sets[0].dataset["label"] == [a[0]]
    with pytest.raises(ValueError, match="someone/imagenet-a:<split>"):
        imagenet_eval_sets({"imagenet_a": "someone/imagenet-a"}, allow_partial=True)


# --- robustness fit ------------------------------------------------------------------------------------------------


def test_robustness_fit_goes_through_zero_shot_runs_only():
    runs = [
        RunResult("zs-a", "a", True, {"id": 50.0, "o1": 30.0, "o2": 20.0}),
        RunResult("zs-b", "b", True, {"id": 70.0, "o1": 40.0, "o2": 40.0}),
        RunResult("ft", "c", False, {"id": 90.0, "o1": 10.0, "o2": 10.0}),
    ]
    slope, intercept = robustness_fit(runs, "id", ["o1", "o2"])
    assert slope == pytest.approx(0.75) and intercept == pytest.approx(-12.5)
    assert robustness_fit(runs[:1], "id", ["o1"]) is None


# --- the recipe, end to end ----------------------------------------------------------------------------------------


def _save_classifier(path: Path, class_names, seed: int = 2) -> Path:
    clip = tiny_clip(seed)
    torch.manual_seed(seed)
    weights = torch.randn(len(class_names), clip.config.projection_dim)
    classifier_from_clip(clip, weights, list(class_names)).save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return path


def test_recipe_scores_zero_shot_clips_and_a_saved_classifier_on_user_splits(tmp_path):
    images = write_imagefolder(tmp_path / "images", splits=("test_id", "ood_a", "ood_b"), per_class=2)
    clip_a, clip_b = save_tiny_clip(tmp_path / "clip_a", seed=0), save_tiny_clip(tmp_path / "clip_b", seed=1)
    tuned = _save_classifier(tmp_path / "tuned", CLASSES)
    out = tmp_path / "out"
    report = _recipe().main(
        ["--model_name_or_path", str(clip_a), str(clip_b), str(tuned), "--dataset_name", str(images),
         "--id_split", "test_id", "--ood_splits", "ood_a", "ood_b", "--templates", "simple",
         "--output_dir", str(out), "--device", "cpu", "--batch_size", "4"]
    )  # fmt: skip

    assert json.loads((out / "results.json").read_text()) == report
    runs = report["runs"]
    assert set(runs) == {"clip_a", "clip_b", "tuned"}
    assert [runs[n]["zero_shot"] for n in ("clip_a", "clip_b", "tuned")] == [True, True, False]
    for run in runs.values():
        assert set(run["accuracy"]) == {"test_id", "ood_a", "ood_b"}
        assert run["ood_avg"] == pytest.approx((run["accuracy"]["ood_a"] + run["accuracy"]["ood_b"]) / 2)
        assert run["id"] == run["accuracy"]["test_id"]
    assert report["num_examples"] == {"test_id": 6, "ood_a": 6, "ood_b": 6}
    distinct = runs["clip_a"]["id"] != runs["clip_b"]["id"]
    assert (report["zero_shot_fit"] is not None) == distinct
    table = (out / "results.md").read_text()
    assert "| model | test_id (ID) | ood_a | ood_b | OOD avg |" in table and "| tuned |" in table
    with Image.open(out / "effective_robustness.png") as png:
        assert png.format == "PNG" and png.size[0] >= 400 and png.size[1] >= 300


def _imagenet_tree(root: Path) -> Path:
    """Two images per class for a few classes of every set, in each set's published layout."""
    r, a = imagenet_r_indices(), imagenet_a_indices()
    layout = {
        "imagenet/val": [WNIDS[0], WNIDS[r[0]]],
        "imagenetv2-matched-frequency-format-val": ["0", "10", "2"],
        "imagenet-r": [WNIDS[r[0]], WNIDS[r[1]]],
        "sketch": [WNIDS[5], WNIDS[999]],
        "imagenet-a": [WNIDS[a[0]]],
        "objectnet-1.0/images": ["alarm_clock", "chair", "squeegee"],
    }
    for sub, folders in layout.items():
        for seed, folder in enumerate(folders):
            _images(root / sub / folder, 2, seed=seed)
    return root


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # Before: rc 0, the ID split's accuracy averaged as OOD.
        (["--id_split", "test_id", "--ood_splits", "test_id", "ood_a"], "holds the in-distribution split 'test_id'"),
        (["--dataset_name", "world", "--ood_splits", "test_id"], "holds the in-distribution split 'test_id'"),
        # Before: rc 0, ood_a counted twice in the OOD average.
        (["--id_split", "test_id", "--ood_splits", "ood_a", "ood_a", "ood_b"], "names 'ood_a' more than once"),
        # Before: 0 read as "no limit", every image scored.
        (["--id_split", "test_id", "--max_eval_samples", "0"], "--max_eval_samples 0 must be a positive number"),
    ],
)
def test_recipe_refuses_splits_that_would_make_a_wrong_ood_average(tmp_path, flags, message):
    images = write_imagefolder(tmp_path / "images", splits=("test_id", "ood_a", "ood_b"), per_class=1)
    argv = ["--model_name_or_path", str(tmp_path / "unused"), "--dataset_name", str(images), *flags,
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        _recipe().main(argv)
    assert not (tmp_path / "out").exists()


def test_recipe_runs_the_imagenet_benchmark_on_the_published_layouts(tmp_path):
    root = _imagenet_tree(tmp_path / "shifts")
    names = load_class_names("imagenet")
    config = ClipCfftConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    torch.manual_seed(0)
    ClipCfftForImageClassification(config).save_pretrained(tmp_path / "in1k")
    tiny_image_processor().save_pretrained(tmp_path / "in1k")
    args = ["--model_name_or_path", str(tmp_path / "in1k"), "--benchmark", "imagenet", "--data_root", str(root),
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip

    with pytest.raises(IncompleteShiftError, match="ImageNet"):
        _recipe().main(args)
    report = _recipe().main([*args, "--allow_partial"])

    assert report["id_split"] == "imagenet"
    assert report["ood_splits"] == ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"]
    assert report["num_examples"]["objectnet"] == 4  # the squeegee folder is not an ImageNet class
    run = report["runs"]["in1k"]
    assert set(run["accuracy"]) == set(SHIFTS) and 0.0 <= run["ood_avg"] <= 100.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| model | ImageNet (ID) | ImageNet-V2 | ImageNet-R | ImageNet-Sketch | ImageNet-A | ObjectNet |" in table
    assert (tmp_path / "out" / "effective_robustness.png").is_file()


def test_hub_dataset_value_features_keep_int64_labels():
    features = Features({"image": ImageFeature(), "label": Value("int32")})
    hub = Dataset.from_dict({"image": _pil(1), "label": [3]}, features=features)
    assert shift_from_dataset("imagenet_v2", hub, allow_partial=True).features["label"] == Value("int64")
