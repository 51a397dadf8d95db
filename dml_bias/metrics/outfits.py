r"""Outfit metrics of Polyvore Outfits: fill-in-the-blank accuracy and compatibility AUC.

Both follow the evaluation of PAN :cite:`mishra2021pan` (and of the Polyvore Outfits benchmark it uses):

* **FITB** — each question is a partial outfit with :math:`C` candidate items; the model scores every candidate
  (PAN: the mean edge probability between the candidate and the outfit's items), the prediction is the
  highest-scoring candidate, and the metric is the fraction of questions answered correctly.
* **Compatibility AUC** — each outfit gets one score (PAN: the mean pairwise probability over its items) and a
  label (1 compatible, 0 not); the metric is the area under the ROC curve.
"""

from __future__ import annotations

import torch

from dml_bias._checks import check_dtype, check_finite, check_labels, check_shape, check_tensor, describe

__all__ = ["compatibility_auc", "fitb_accuracy"]


def fitb_accuracy(scores: torch.Tensor, answers: torch.Tensor) -> float:
    r"""Fill-in-the-blank accuracy: the fraction of questions whose highest-scoring candidate is the answer.

    .. math::

        \mathrm{FITB} = \frac{1}{Q} \sum_{q=1}^{Q} \big[\hat c_q = a_q\big], \qquad
        \hat c_q = \min\,\operatorname*{arg\,max}_{c} s_{qc}

    Ties go to the **first** (lowest-index) tied candidate, on every device.

    Args:
        scores: ``(Q, C)`` floating-point tensor, the score of each candidate of each question (larger is
            better), finite.
        answers: ``(Q,)`` integer tensor, the index in ``[0, C)`` of the correct candidate of each question
            (Polyvore's files list the correct one first: pass ``torch.zeros(Q, dtype=torch.long)``).

    Returns:
        The accuracy as a float in :math:`[0, 1]`.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.5, 0.1, 0.0], [0.1, 0.2, 0.7, 0.7]])
        >>> fitb_accuracy(scores, torch.tensor([0, 1, 3]))  # ties pick candidates 0 and 2: only question 0 is right
        0.3333333333333333
    """
    check_tensor(scores, "scores")
    check_dtype(scores, "scores", "floating")
    sizes = check_shape(scores, "scores", ("Q", "C"))
    if sizes["Q"] == 0 or sizes["C"] == 0:
        raise ValueError(f"scores must hold at least one question and one candidate, got {describe(scores)}")
    check_labels(answers, "answers", length=sizes["Q"], length_source="scores.shape[0]", num_classes=sizes["C"])
    if answers.device != scores.device:
        raise ValueError(f"answers must be on the same device as scores ({scores.device}), got device {answers.device}")
    check_finite(scores, "scores")
    best = scores.max(dim=1, keepdim=True).values
    column = torch.arange(sizes["C"], device=scores.device).expand_as(scores)
    # The smallest column index among the maxima (argmax's tie rule is not documented for every backend).
    prediction = torch.where(scores == best, column, sizes["C"]).min(dim=1).values
    return float((prediction == answers).to(torch.float64).mean())


def compatibility_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Area under the ROC curve of outfit compatibility scores, ties counted one half.

    The Mann–Whitney form, computed from average ranks in :math:`O(n \log n)`:

    .. math::

        \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
            \Big([s_i > s_j] + \tfrac{1}{2}[s_i = s_j]\Big)
        = \frac{\sum_{i: y_i = 1} \operatorname{rank}(s_i) - n_+(n_+ + 1)/2}{n_+ n_-}

    with 1-based ranks in increasing score order and tied scores given their average rank. This equals
    scikit-learn's ``roc_auc_score(labels, scores)`` (up to floating-point rounding).

    Args:
        scores: ``(N,)`` floating-point tensor of outfit scores (larger means more compatible), finite.
        labels: ``(N,)`` boolean or integer tensor with values in ``{0, 1}`` (1 = compatible).

    Returns:
        The AUC as a float in :math:`[0, 1]`.

    Raises:
        ValueError: If ``labels`` holds only one class (the AUC is undefined) or values other than 0 and 1.

    Example:
        >>> import torch
        >>> compatibility_auc(torch.tensor([0.9, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0]))
        0.875
    """
    check_tensor(scores, "scores")
    check_dtype(scores, "scores", "floating")
    sizes = check_shape(scores, "scores", ("N",))
    check_tensor(labels, "labels")
    if labels.dtype == torch.bool:
        labels = labels.long()
    check_labels(labels, "labels", length=sizes["N"], length_source="scores.shape[0]", num_classes=2)
    if labels.device != scores.device:
        raise ValueError(f"labels must be on the same device as scores ({scores.device}), got device {labels.device}")
    check_finite(scores, "scores")
    num_pos = int(labels.sum())
    num_neg = sizes["N"] - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"labels must contain both classes 0 and 1 for the AUC to be defined, got {num_pos} positive(s) "
            f"and {num_neg} negative(s)"
        )
    values = scores.to(torch.float64)
    sorted_values, order = torch.sort(values)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    # Average 1-based rank of each group of tied scores: start + (count + 1) / 2.
    ends = torch.cumsum(counts, 0).to(torch.float64)
    group_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks_sorted = torch.repeat_interleave(group_rank, counts)
    positive_rank_sum = float((ranks_sorted * labels[order].to(torch.float64)).sum())
    return (positive_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
