"""Scale-out: the teacher-CAM pass and evaluation over 2 CPU processes give what 1 process gives.

Each of the 2 processes computes its contiguous half of the CAMs (9 rows: 5 and 4), the shards come back in order
as one column, bitwise equal to the 1-process one, and a second call reads the cached column without computing a
row. Evaluation of a 9-image split (uneven halves) gives the 1-process accuracy and logits, every row once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _builders import CLASSES, tiny_image_processor, write_imagefolder

from hf_cfft._distributed import shard_bounds
from hf_cfft.modeling import ClipCfftConfig, ClipCfftForImageClassification

# Runs as one process (plain python) or as each of 2 (accelerate launch); writes what it saw to <out>/rank<r>.json.
_DRIVER = """
import json, sys
import numpy as np, torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoImageProcessor
import hf_cfft.distributed_cams as distributed_cams
from hf_cfft import ClipCfftForImageClassification
from hf_cfft.evaluation import evaluate_splits, predict_logits

model_dir, images, cache, out = sys.argv[1:5]
state = PartialState(cpu=True)
rows = []
compute_cam = distributed_cams.compute_cam
def counting(model, pixels, labels, method):
    rows.append(int(pixels.shape[0]))
    return compute_cam(model, pixels, labels, method)
distributed_cams.compute_cam = counting

model = ClipCfftForImageClassification.from_pretrained(model_dir).eval()
processor = AutoImageProcessor.from_pretrained(model_dir)
with state.local_main_process_first():
    train = load_dataset("imagefolder", data_dir=images, split="train", cache_dir=cache)
in_memory = train.map(lambda row: row, keep_in_memory=True)
assert train.cache_files and not in_memory.cache_files
seen = {"world": state.num_processes}
for name, dataset, dtype in (("file", train, torch.float16), ("memory", in_memory, torch.float32)):
    rows.clear()
    cams = distributed_cams.precompute_cams(dataset, model, processor, batch_size=1, dtype=dtype)
    seen[name + "_rows"] = sum(rows)
    np.save(f"{out}/{name}_cams_rank{state.process_index}.npy", distributed_cams.cam_array(cams))
rows.clear()
distributed_cams.precompute_cams(train, model, processor, batch_size=1, dtype=torch.float16)
seen["cached_rows"] = sum(rows)
kwargs = dict(batch_size=2, distributed=state.num_processes > 1, show_progress=True)
logits, labels = predict_logits(model, train, processor, **kwargs)
np.save(f"{out}/logits_rank{state.process_index}.npy", logits)
seen["labels"] = labels.tolist()
seen["accuracy"] = evaluate_splits(model, {"train": train, "again": train}, processor, **kwargs)
with open(f"{out}/rank{state.process_index}.json", "w") as f:
    json.dump(seen, f)
"""


def test_contiguous_shards_cover_every_row_once():
    for length in (0, 1, 9, 10, 17):
        for shards in (1, 2, 3, 8):
            bounds = [shard_bounds(length, shards, i) for i in range(shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def _run(tmp_path: Path, name: str, processes: int) -> Path:
    out = tmp_path / name
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    launcher = (
        ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if processes > 1
        else []
    )
    command = [sys.executable, *launcher, str(driver), str(tmp_path / "model"), str(tmp_path / "images")]
    command += [str(tmp_path / f"cache_{name}"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
@pytest.mark.skipif(sys.platform != "linux", reason="two CPU processes via accelerate launch")
def test_two_processes_shard_the_cam_pass_and_evaluation_and_match_one_process(tmp_path):
    torch.manual_seed(0)
    config = ClipCfftConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    ClipCfftForImageClassification(config).save_pretrained(tmp_path / "model")
    tiny_image_processor().save_pretrained(tmp_path / "model")
    write_imagefolder(tmp_path / "images", splits=("train",), per_class=3)  # 9 images: halves of 5 and 4

    one, two = _run(tmp_path, "one", 1), _run(tmp_path, "two", 2)
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    # Each process computed its own contiguous half, once; the second call read the cache.
    assert single["file_rows"] == single["memory_rows"] == 9
    assert [r["file_rows"] for r in ranks] == [r["memory_rows"] for r in ranks] == [5, 4]
    assert single["cached_rows"] == 0 and [r["cached_rows"] for r in ranks] == [0, 0]
    for name, dtype in (("file", np.float16), ("memory", np.float32)):
        expected = np.load(one / f"{name}_cams_rank0.npy")
        assert expected.shape == (9, 16) and expected.dtype == dtype
        for rank in range(2):  # the assembled column, on every process, equals the 1-process one bit for bit
            got = np.load(two / f"{name}_cams_rank{rank}.npy")
            assert got.dtype == dtype and np.array_equal(got.view(np.uint8), expected.view(np.uint8)), name
    # Evaluation: every row scored once, in order, on every process.
    expected_logits = np.load(one / "logits_rank0.npy")
    for rank in range(2):
        assert ranks[rank]["labels"] == single["labels"] and len(single["labels"]) == 9
        np.testing.assert_allclose(np.load(two / f"logits_rank{rank}.npy"), expected_logits, rtol=1e-5, atol=1e-6)
        assert ranks[rank]["accuracy"] == single["accuracy"]


def test_evaluation_runs_under_the_training_precision(tiny_classifier, tiny_image_processor):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from hf_cfft.evaluation import predict_logits

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    features = Features({"image": Image(), "label": Value("int64")})
    dataset = Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1]}, features)
    dtypes = []
    tiny_classifier.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(
        lambda module, args, out: dtypes.append(out.dtype)
    )
    fp32, labels = predict_logits(tiny_classifier, dataset, tiny_image_processor, batch_size=2)
    bf16, _ = predict_logits(
        tiny_classifier, dataset, tiny_image_processor, batch_size=2, autocast_dtype=torch.bfloat16, num_workers=1
    )
    assert dtypes == [torch.float32] * 3 + [torch.bfloat16] * 3
    assert bf16.dtype == np.float32 and labels.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_allclose(bf16, fp32, atol=5e-2)


def test_every_process_runs_as_many_forwards_as_the_largest_share(tiny_classifier, tiny_image_processor, monkeypatch):
    """A sharded model (FSDP) gathers weights in each forward: a process with a shorter share must not stop early."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    import hf_cfft._distributed as distributed
    import hf_cfft.evaluation.prediction as prediction

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(9)]
    dataset = Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(9)]}, Features({"image": Image(), "label": Value("int64")})
    )
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))  # the second of 2 processes: rows 5..8
    monkeypatch.setattr(distributed, "gather_rows", lambda rows, device=None: rows)
    calls = []
    tiny_classifier.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    logits, labels = prediction.predict_logits(
        tiny_classifier, dataset, tiny_image_processor, batch_size=2, distributed=True
    )
    assert labels.tolist() == [2, 0, 1, 2] and logits.shape == (4, 3)
    assert len(calls) == 3  # 2 batches of its own + 1 spare: the first process's 5 rows take 3
