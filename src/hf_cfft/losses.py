"""The counterfactual fine-tuning objective as pure functions: tensors in, named loss parts out.

    L = CE(g(f(x)), y) + beta * D(f_hat(x_cf), f(x_cf))

D is the mean squared error between image embeddings (the paper's feature distillation) or, as an alternative, a
temperature-scaled KL divergence between the heads' predictions (logit distillation, "FT+KD").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_TARGETS = ("features", "logits")


def feature_distillation_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> torch.Tensor:
    """MSE between unnormalised image embeddings, averaged over batch and feature dims: [B, D], [B, D] -> []."""
    return F.mse_loss(student_embeds.float(), teacher_embeds.float())


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean: [B, K], [B, K] -> []."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def counterfactual_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    student_cf: torch.Tensor | None,
    teacher_cf: torch.Tensor | None,
    *,
    distill_weight: float,
    distill_target: str = "features",
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Task loss plus weighted distillation on counterfactuals -> {"loss", "task_loss", "distill_loss"}.

    logits: [B, K]; labels: [B]; student_cf / teacher_cf: [B, D] embeddings (``distill_target='features'``) or
    [B, K] logits (``'logits'``) of the counterfactual images. With ``distill_weight == 0`` or no counterfactuals the
    loss is exactly the cross-entropy (vanilla fine-tuning). ``label_smoothing`` (``label_smoothing_factor``) smooths
    the task loss's targets as torch and transformers' ``LabelSmoother`` do: (1 - e) * NLL + e * mean over classes of
    -log p.
    """
    task = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if distill_weight == 0 or student_cf is None:
        distill = task.new_zeros(())
        return {"loss": task, "task_loss": task.detach(), "distill_loss": distill}
    if distill_target == "features":
        distill = feature_distillation_loss(student_cf, teacher_cf)
    elif distill_target == "logits":
        distill = logit_distillation_loss(student_cf, teacher_cf, temperature)
    else:
        raise ValueError(f"distill_target={distill_target!r} is not one of {DISTILL_TARGETS}")
    return {"loss": task + distill_weight * distill, "task_loss": task.detach(), "distill_loss": distill.detach()}
