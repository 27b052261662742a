"""Specification of hf_cfft.losses: L = CE(g(f(x)), y) + beta * D(f_hat(x_cf), f(x_cf))."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_cfft.losses import counterfactual_loss, feature_distillation_loss, logit_distillation_loss


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    student = torch.randn(4, 16, generator=generator)
    teacher = torch.randn(4, 16, generator=generator)
    return logits, labels, student, teacher


def test_feature_distillation_is_the_mean_squared_error_over_batch_and_features():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    # (1 + 0 + 4 + 9) / 4 = 3.5
    assert feature_distillation_loss(student, teacher).item() == pytest.approx(3.5)
    _, _, s, t = _tensors()
    torch.testing.assert_close(feature_distillation_loss(s, t), ((s - t) ** 2).mean())


def test_feature_distillation_is_computed_in_float32_for_half_inputs():
    _, _, s, t = _tensors()
    loss = feature_distillation_loss(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((s.bfloat16().float() - t.bfloat16().float()) ** 2).mean())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_distillation_is_t_squared_times_kl_of_teacher_to_student(temperature):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 4, generator=generator) * 3
    teacher = torch.randn(5, 4, generator=generator) * 3
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        expected += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    expected = temperature**2 * expected / 5
    loss = logit_distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_logit_distillation_is_zero_when_student_matches_teacher():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert logit_distillation_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_distill_weight_is_exactly_cross_entropy_with_its_gradient():
    logits, labels, student, teacher = _tensors()
    logits_a = logits.clone().requires_grad_(True)
    student_a = student.clone().requires_grad_(True)
    parts = counterfactual_loss(logits_a, labels, student_a, teacher, distill_weight=0.0)
    logits_b = logits.clone().requires_grad_(True)
    vanilla = F.cross_entropy(logits_b, labels)
    assert torch.equal(parts["loss"], vanilla)
    assert torch.equal(parts["task_loss"], vanilla.detach())
    assert parts["distill_loss"].item() == 0.0
    parts["loss"].backward()
    vanilla.backward()
    assert torch.equal(logits_a.grad, logits_b.grad)
    assert student_a.grad is None  # the distillation branch is not even in the graph


def test_missing_counterfactuals_give_plain_cross_entropy():
    logits, labels, _, _ = _tensors()
    parts = counterfactual_loss(logits, labels, None, None, distill_weight=30.0)
    assert torch.equal(parts["loss"], F.cross_entropy(logits, labels))
    assert parts["distill_loss"].item() == 0.0


@pytest.mark.parametrize("weight", [0.5, 30.0])
def test_weighted_loss_is_task_plus_weight_times_feature_distillation(weight):
    logits, labels, student, teacher = _tensors()
    parts = counterfactual_loss(logits, labels, student, teacher, distill_weight=weight)
    task = F.cross_entropy(logits, labels)
    distill = ((student - teacher) ** 2).mean()
    torch.testing.assert_close(parts["task_loss"], task)
    torch.testing.assert_close(parts["distill_loss"], distill)
    torch.testing.assert_close(parts["loss"], task + weight * distill)
    assert not parts["task_loss"].requires_grad and not parts["distill_loss"].requires_grad


def test_distillation_gradient_reaches_the_student_embeddings_only():
    logits, labels, student, teacher = _tensors()
    student = student.requires_grad_(True)
    teacher = teacher.requires_grad_(True)
    counterfactual_loss(logits, labels, student, teacher, distill_weight=30.0)["loss"].backward()
    # d/ds [w * mean((s - t)^2)] = w * 2 (s - t) / numel
    torch.testing.assert_close(student.grad, 30.0 * 2 * (student - teacher).detach() / student.numel())


def test_weighted_loss_with_logit_targets_uses_temperature_scaled_kd():
    logits, labels, _, _ = _tensors()
    generator = torch.Generator().manual_seed(3)
    student_logits, teacher_logits = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    parts = counterfactual_loss(
        logits,
        labels,
        student_logits,
        teacher_logits,
        distill_weight=2.0,
        distill_target="logits",
        temperature=3.0,
    )
    kd = logit_distillation_loss(student_logits, teacher_logits, 3.0)
    torch.testing.assert_close(parts["distill_loss"], kd)
    torch.testing.assert_close(parts["loss"], F.cross_entropy(logits, labels) + 2.0 * kd)


def test_unknown_distill_target_raises_naming_it():
    logits, labels, student, teacher = _tensors()
    with pytest.raises(ValueError, match="distill_target='attention'"):
        counterfactual_loss(logits, labels, student, teacher, distill_weight=1.0, distill_target="attention")
