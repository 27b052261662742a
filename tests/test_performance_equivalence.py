"""Every performance optimisation computes what the plain code computes; the benchmark scripts run.

The optimisations (docs/performance.md): no-fill drops tokens instead of masking them as keys; teacher CAMs are
computed once and cut into masks by the transform; on CPU the clean and counterfactual images take two forwards
instead of one of 2B; the teacher runs first, in inference mode, under the student's autocast; the student's CAM is
read off its sdpa training forward (`CamRecorder`) instead of an extra eager pass; attention rollout pushes a row
vector instead of forming the relevance matrix; refilling moves patches through views instead of three copies.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _builders import load_script
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.cam import CamRecorder, attention_rollout, compute_cam
from hf_cfft.data import (
    CounterfactualCollator,
    CounterfactualTransform,
    batch_generator,
    precompute_cams,
    preprocess_images,
)
from hf_cfft.masking import (
    cam_patch_mask,
    make_counterfactuals,
    multi_fill_sources,
    patchify,
    random_patch_mask,
    refill,
    single_fill_partners,
    unpatchify,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PATCH, GRID = 8, (4, 4)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trainer(model, tmp_path, **overrides) -> CfftTrainer:
    args = {"output_dir": str(tmp_path), "use_cpu": True, "per_device_train_batch_size": 4, "seed": 0, **overrides}
    return CfftTrainer(model=model, args=CfftConfig(**args))


def _attention_calls(model) -> tuple[list[tuple[str, bool]], list]:
    """Hooks recording (attention implementation in effect, module.training) at every attention call of ``model``."""
    calls, handles = [], []
    for layer in model.vision_model.encoder.layers:
        attention = layer.self_attn

        def record(module, args, kwargs):
            calls.append((module.config._attn_implementation, module.training))

        handles.append(attention.register_forward_pre_hook(record, with_kwargs=True))
    return calls, handles


# ---- no-fill: dropped tokens ----


def test_token_drop_gives_the_key_masked_cls_output(tiny_classifier):
    """Random masks keep the same count per image, so no-fill drops tokens; masking them as keys is the reference."""
    images = _images(5)
    keep = ~random_patch_mask(4, GRID, 0.5, torch.Generator().manual_seed(1)).flatten(1)
    # A fifth image keeping a different number of patches sends the whole batch down the key-mask path.
    odd = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        dropped = tiny_classifier.get_image_features(images[:4], keep)
        key_masked = tiny_classifier.get_image_features(images, torch.cat([keep, odd]))[:4]
    torch.testing.assert_close(dropped, key_masked, atol=1e-5, rtol=1e-5)


# ---- cached teacher CAMs ----


def _pil_dataset(count: int = 12) -> Dataset:
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    labels = rng.integers(0, 3, count).tolist()
    return Dataset.from_dict({"image": images, "label": labels}, Features({"image": Image(), "label": Value("int64")}))


@pytest.mark.parametrize("mask_kind", ["object", "context"])
def test_cached_teacher_cams_cut_the_masks_of_a_fresh_cam(tiny_classifier, tiny_image_processor, mask_kind):
    teacher, dataset = tiny_classifier.requires_grad_(False), _pil_dataset()
    cached = precompute_cams(dataset, teacher, tiny_image_processor, batch_size=64)
    transform = CounterfactualTransform(tiny_image_processor, grid=GRID, mask_kind=mask_kind, num_labels=3)
    examples = [cached.with_transform(transform)[i] for i in range(len(dataset))]

    pixels = preprocess_images(tiny_image_processor, dataset["image"])
    labels = torch.tensor(dataset["label"])
    fresh = cam_patch_mask(compute_cam(teacher, pixels, labels), mask_kind, 0.3)
    assert 0 < fresh.sum() < fresh.numel()
    assert torch.equal(torch.stack([torch.as_tensor(e["cf_mask"]) for e in examples]), fresh)

    # The collator then refills exactly as make_counterfactuals does with the fresh mask.
    batch = CounterfactualCollator(mask_kind=mask_kind, fill_kind="single", mask_ratio=0.5, patch_size=PATCH)(examples)
    generator = batch_generator(0, pixels, labels)
    expected, _ = make_counterfactuals(pixels, fresh, "single", PATCH, generator)
    torch.testing.assert_close(batch["cf_pixel_values"], expected, atol=0, rtol=0)


# ---- bf16 autocast ----


@pytest.mark.parametrize("distill_target", ["features", "logits"])
def test_bf16_autocast_losses_are_close_to_fp32_and_the_teacher_runs_in_bf16(
    tiny_classifier, tmp_path, distill_target
):
    images, cf, labels = _images(4), _images(4, seed=1), torch.tensor([0, 1, 2, 1])
    inputs = {"pixel_values": images, "labels": labels, "cf_pixel_values": cf}
    results = {}
    for bf16 in (False, True):
        trainer = _trainer(
            copy.deepcopy(tiny_classifier),
            tmp_path / str(bf16),
            mask_kind="random",
            distill_target=distill_target,
            bf16=bf16,
        )
        dtypes = []
        trainer.teacher.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(
            lambda module, args, out, seen=dtypes: seen.append(out.dtype)
        )
        model = trainer.accelerator.prepare_model(trainer.model)  # autocast around forward, as in training
        model.train()
        loss = trainer.compute_loss(model, dict(inputs))
        parts = {key.split("/")[1]: values[-1] for key, values in trainer._metrics.items()}
        results[bf16] = (loss.item(), parts, dtypes)
    (loss32, parts32, dtypes32), (loss16, parts16, dtypes16) = results[False], results[True]
    assert dtypes32 == [torch.float32] and dtypes16 == [torch.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=5e-2)
    for name in ("task_loss", "distill_loss"):
        assert parts16[name] == pytest.approx(parts32[name], rel=5e-2), name


# ---- attention implementations ----


def test_compute_cam_runs_eager_and_leaves_sdpa_for_training(tiny_classifier):
    calls, handles = _attention_calls(tiny_classifier)
    compute_cam(tiny_classifier.train(), _images(3), torch.tensor([0, 1, 2]))
    tiny_classifier(pixel_values=_images(3))
    for handle in handles:
        handle.remove()
    layers = len(tiny_classifier.vision_model.encoder.layers)
    assert calls == [("eager", False)] * layers + [("sdpa", True)] * layers


@pytest.mark.parametrize("cam_from_training_forward", [True, False], ids=["recorded", "extra-eager-pass"])
def test_student_cam_training_forward_runs_sdpa(tiny_classifier, tmp_path, cam_from_training_forward):
    trainer = _trainer(tiny_classifier, tmp_path, cam_source="student", mask_kind="object", fill_kind="single")
    trainer._student_cam_from_training_forward = lambda unwrapped: cam_from_training_forward
    calls, handles = _attention_calls(trainer.model)
    trainer.model.train()
    trainer.compute_loss(trainer.model, {"pixel_values": _images(4), "labels": torch.tensor([0, 1, 2, 1])})
    for handle in handles:
        handle.remove()
    training = {impl for impl, is_training in calls if is_training}
    cam_pass = {impl for impl, is_training in calls if not is_training}
    assert training == {"sdpa"}
    # The recorded CAM needs no pass of its own; the fallback's pass is eager, and only that pass.
    assert cam_pass == (set() if cam_from_training_forward else {"eager"})


# ---- two CPU forwards instead of one of 2B ----


def test_cpu_forward_of_clean_and_counterfactual_images_equals_one_batched_forward(tiny_classifier):
    images, cf = _images(4), _images(4, seed=1)
    with torch.no_grad():
        out = tiny_classifier(pixel_values=images, cf_pixel_values=cf)
        both = tiny_classifier.get_image_features(torch.cat([images, cf]))
    torch.testing.assert_close(out.image_embeds, both[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cf_image_embeds, both[4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cf_logits, tiny_classifier.logits_from_features(both[4:]), atol=1e-5, rtol=1e-5)


# ---- the teacher first, in inference mode ----


@pytest.mark.parametrize("distill_target", ["features", "logits"])
def test_trainer_loss_and_gradients_equal_the_written_out_objective(tiny_classifier, tmp_path, distill_target):
    images, cf, labels = _images(4), _images(4, seed=1), torch.tensor([0, 1, 2, 1])
    reference_model, teacher = copy.deepcopy(tiny_classifier).train(), copy.deepcopy(tiny_classifier).eval()
    # kd_temperature 1: the KL written out below is the plain one (the default is the reference's 10 since issue 24)
    trainer = _trainer(
        tiny_classifier, tmp_path, mask_kind="random", distill_target=distill_target, kd_temperature=1.0
    )
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {"pixel_values": images, "labels": labels, "cf_pixel_values": cf})
    loss.backward()

    # L = CE(g(f(x)), y) + beta * D(f_hat(x_cf), f(x_cf)), written out with a no_grad teacher after the student.
    logits = reference_model(pixel_values=images).logits
    student_cf = reference_model.get_image_features(cf)
    with torch.no_grad():
        teacher_cf = teacher.get_image_features(cf)
    if distill_target == "features":
        distill = F.mse_loss(student_cf, teacher_cf)
    else:
        distill = F.kl_div(
            F.log_softmax(reference_model.logits_from_features(student_cf), -1),
            F.log_softmax(teacher.logits_from_features(teacher_cf), -1),
            log_target=True,
            reduction="batchmean",
        )
    expected = F.cross_entropy(logits, labels) + 30.0 * distill
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for (name, param), reference in zip(trainer.model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- the student's CAM read off its training forward ----


@pytest.mark.parametrize("method", ["rollout", "gradcam"])
def test_cam_recorder_equals_compute_cam_and_keeps_the_graph_for_training(tiny_classifier, method):
    images, labels = _images(5), torch.tensor([0, 1, 2, 1, 0])
    expected = compute_cam(tiny_classifier, images, labels, method)
    reference = copy.deepcopy(tiny_classifier)

    model = tiny_classifier.train()
    with CamRecorder(model, method) as recorder:
        out = model(pixel_values=images)
    cam = recorder.cam(out.logits, labels)
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cam_patch_mask(cam, "object", 0.3), cam_patch_mask(expected, "object", 0.3))
    assert all(p.grad is None for p in model.parameters())  # the CAM's gradients reach no parameter

    F.cross_entropy(out.logits, labels).backward()  # the training backward still runs on the recorded graph
    F.cross_entropy(reference.train()(pixel_values=images).logits, labels).backward()
    for param, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_cam_recorder_needs_a_recorded_forward(tiny_classifier):
    recorder = CamRecorder(tiny_classifier)
    with recorder:
        pass
    with pytest.raises(RuntimeError, match="no forward"):
        recorder.cam(torch.zeros(2, 3, requires_grad=True), torch.tensor([0, 1]))


@pytest.mark.parametrize("fill_kind", ["single", "none"])
def test_student_cam_from_the_training_forward_gives_the_loss_and_gradients_of_an_extra_eager_pass(
    tiny_classifier, tmp_path, fill_kind
):
    images, labels = _images(4), torch.tensor([0, 1, 2, 1])
    results = []
    for recorded in (True, False):
        trainer = _trainer(
            copy.deepcopy(tiny_classifier),
            tmp_path / str(recorded),
            cam_source="student",
            mask_kind="object",
            fill_kind=fill_kind,
        )
        trainer._student_cam_from_training_forward = lambda unwrapped, value=recorded: value
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, {"pixel_values": images, "labels": labels})
        loss.backward()
        results.append((loss, [p.grad for p in trainer.model.parameters()]))
    (loss_recorded, grads_recorded), (loss_eager, grads_eager) = results
    torch.testing.assert_close(loss_recorded, loss_eager, atol=1e-5, rtol=1e-5)
    for recorded, eager in zip(grads_recorded, grads_eager):
        torch.testing.assert_close(recorded, eager, atol=1e-5, rtol=1e-4)


def test_student_cam_falls_back_to_the_eager_pass_when_the_forward_differs_from_it(tiny_classifier, tmp_path):
    trainer = _trainer(tiny_classifier, tmp_path, cam_source="student", mask_kind="object")
    assert trainer._student_cam_from_training_forward(tiny_classifier)
    tiny_classifier.config.vision_config.attention_dropout = 0.1  # train-mode forward != the CAM's eval pass
    assert not trainer._student_cam_from_training_forward(tiny_classifier)


# ---- attention rollout as a row-vector product ----


def _rollout_with_the_full_relevance_matrix(attentions, grads):
    """The textbook form: R = I; R += mean_heads(clamp(grad * attn, 0)) @ R per block; row CLS over the patches."""
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, dtype=torch.float64).expand(batch, tokens, tokens)
    for attn, grad in zip(attentions, grads):
        relevance = relevance + torch.bmm((grad * attn).clamp(min=0).mean(dim=1), relevance)
    return relevance[:, 0, 1:]


def test_rollout_row_vector_product_equals_the_full_relevance_matrix():
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.rand(3, 4, 17, 17, generator=generator).softmax(-1).double() for _ in range(6)]
    grads = [torch.randn(3, 4, 17, 17, generator=generator).double() for _ in range(6)]
    expected = _rollout_with_the_full_relevance_matrix(attentions, grads)
    torch.testing.assert_close(attention_rollout(attentions, grads).double(), expected, atol=1e-5, rtol=1e-5)


# ---- refilling through patch views ----


def _refill_with_three_copies(pixel_values, mask, fill, patch_size, generator=None):
    """The textbook form: patchify, choose donors, torch.where, unpatchify."""
    b, c, height, width = pixel_values.shape
    grid = (height // patch_size, width // patch_size)
    patches = patchify(pixel_values, patch_size)
    if fill == "none":
        donors = torch.zeros_like(patches)
    elif fill == "single":
        donors = patches[single_fill_partners(b, generator)]
    else:
        donors = patches[multi_fill_sources(b, patches.shape[1], generator), torch.arange(patches.shape[1])]
    return unpatchify(torch.where(mask.reshape(b, -1, 1), donors, patches), c, grid, patch_size)


@pytest.mark.parametrize("fill", ["none", "single", "multi"])
@pytest.mark.parametrize("seed", [0, 1])
def test_refill_through_patch_views_equals_patchify_where_unpatchify(fill, seed):
    images = _images(5, seed)
    mask = torch.rand(5, *GRID, generator=torch.Generator().manual_seed(seed)) > 0.4
    out = refill(images, mask, fill, PATCH, torch.Generator().manual_seed(seed))
    expected = _refill_with_three_copies(images, mask, fill, PATCH, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # Channels-last input (a strided layout) gives the same pixels and leaves the input untouched.
    strided = images.to(memory_format=torch.channels_last)
    before = strided.clone()
    torch.testing.assert_close(refill(strided, mask, fill, PATCH, torch.Generator().manual_seed(seed)), expected)
    assert torch.equal(strided, before)


# ---- the benchmark scripts ----


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return load_script(BENCHMARKS / f"{name}.py", f"_bench_{name}")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_training_benchmark_runs_its_gpu_code_path_at_micro_size_on_cpu(tmp_path):
    """bf16 autocast, FLOP counting and MFU against --peak_tflops, memory, ratios: the GPU run's path on a CPU."""
    bench = _load("training_throughput")
    cases = "ft,ft_kd,cfft_teacher_single,cfft_student_single,random_none,flyp,cam_pass,data"
    output = tmp_path / "report.md"
    report = bench.main(
        [
            "--size",
            "micro",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--bf16",
            "--peak_tflops",
            "1",
            "--cases",
            cases,
            "--output",
            str(output),
        ]
    )
    assert output.read_text(encoding="utf-8") == report
    assert "bf16 autocast" in report and "| MFU |" in report and "peak MiB" in report
    for name in cases.split(","):
        assert f"(`{name}`)" in report
    assert "`cfft_teacher_single` <= 2.4x vanilla FT" in report and "data pipeline per worker" in report


def test_profile_benchmark_lists_the_top_operators_of_a_step(capsys):
    _load("profile_step").main(
        ["--size", "micro", "--device", "cpu", "--cases", "cfft_teacher_single", "--steps", "1", "--top", "3"]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert "### `cfft_teacher_single`" in out and len(rows) == 3
    assert any(row.startswith("| `aten::") for row in rows)  # the model's operators, not only the harness's
