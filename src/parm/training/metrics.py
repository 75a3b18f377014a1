"""Accuracy metrics of the deployed model (A_a) and of reconstructions in degraded mode (A_d)."""

from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """scores (..., C), labels (...) -> bool (...): is the label among the k highest scores."""
    k = min(k, scores.shape[-1])
    top = scores.topk(k, dim=-1).indices  # (..., k)
    return (top == labels.unsqueeze(-1)).any(dim=-1)


def degraded_metrics(recon: torch.Tensor, base_out: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """Metrics over every group and every erased position.

    recon (G, k, C): reconstruction of position j of group g when it alone is missing;
    base_out (G, k, C): the deployed model's outputs; labels (G, k), or None for unlabelled inputs
    (then only ``reconstruction_top1``, the agreement with the deployed model, is measured).
    """
    metrics = {"reconstruction_top1": (recon.argmax(-1) == base_out.argmax(-1)).float().mean().item()}
    if labels is not None:
        metrics["degraded_top1"] = topk_correct(recon, labels, 1).float().mean().item()
        metrics["degraded_top5"] = topk_correct(recon, labels, 5).float().mean().item()
    return metrics


def default_top1(labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of the best constant output: always answering the most frequent class."""
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    return (counts.max() / labels.numel()).item()


def overall_accuracy(available: float, degraded: float, fraction_reconstructed: float) -> float:
    """A_o = (1 − f)·A_a + f·A_d."""
    return (1 - fraction_reconstructed) * available + fraction_reconstructed * degraded
