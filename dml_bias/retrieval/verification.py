r"""Batched spatial verification (RANSAC with an affine model) and DELG's re-ranking :cite:`cao2020delg`.

DELG re-ranks the top 100 images of the global ranking by the number of RANSAC inliers of the putative local
feature matches between the query and each candidate (``detect_to_retrieve/image_reranking.py`` with the
settings of ``delg/perform_retrieval.py``). The reference code loops over candidates in Python, builds a KD-tree
per candidate and calls scikit-image's ``ransac`` with ``AffineTransform``.
:func:`~dml_bias.retrieval.spatial_verification` computes the same counts for all candidates and all RANSAC
hypotheses at once as tensors, on any device; :func:`~dml_bias.retrieval.rerank` applies them to a global ranking
as DELG does.

How a count is computed, for each candidate image:

1. **Putative matches.** Every query descriptor is matched to its nearest index descriptor (L2) and kept when
   that distance is *strictly* below ``descriptor_threshold`` (scipy's ``cKDTree.query(...,
   distance_upper_bound=...)``, which DELG uses, rejects a distance equal to the bound) and, with a
   ``ratio_test`` :math:`r`, when :math:`d_1 < r\,d_2` (Lowe's test with the second-nearest distance
   :math:`d_2`; :math:`d_2 = \infty` when the candidate has a single descriptor, so that test passes).
2. **Minimum matches.** A candidate with at most 3 putative matches gets 0.
3. **Hypotheses.** ``max_trials`` samples of 3 distinct matches are drawn uniformly. Each gives the exact affine
   map :math:`x \mapsto Ax + t` taking the 3 *index* locations to the 3 *query* locations (this is DELG's
   direction: it calls ``ransac((index_locations, query_locations), AffineTransform, ...)``), solved in closed
   form by Cramer's rule in float64. A sample whose index locations are (nearly) collinear or coincide,
   :math:`|\det[s_1 - s_0,\; s_2 - s_0]| \le 10^{-6}\,\|s_1 - s_0\|\,\|s_2 - s_0\|`, or whose 3 query locations
   coincide, gives no model and is skipped, as scikit-image skips samples whose estimate fails.
4. **Inliers.** A match is an inlier of a model when its residual
   :math:`\|A s + t - q\|` (in query pixels) is *strictly* below ``residual_threshold`` (scikit-image's
   ``residuals < residual_threshold``). The count of a candidate is the largest inlier count over its
   hypotheses (0 when none gives a model), which is what DELG reads: scikit-image returns the inlier mask of
   the best hypothesis; it re-estimates the final model on those inliers but does **not** recount them.

Departures from scikit-image (version 0.26 checked), all rare in practice:

* A sample with collinear index locations never gives a model here. scikit-image's least-squares solve fails
  on most of them too, but when the 3 query locations happen to be an exact affine image of the collinear index
  locations it returns one arbitrary map of the family that fits them.
* scikit-image may stop before ``max_trials``: even with its default ``stop_probability=1`` the number of trials
  it needs is clipped to a finite value once the best inlier ratio is high (about 270 trials at a ratio of 0.5).
  Here every candidate gets exactly ``max_trials`` hypotheses.
* The samples are drawn differently (its NumPy stream cannot be reproduced), so single counts agree with
  DELG's only up to RANSAC's randomness; they are deterministic given ``seed`` and the inputs.

Numerics. Descriptor distances are computed as one batched GEMM per block of candidates in float32 (float64 when
either descriptor tensor is float64); a row whose nearest (or, with the ratio test, second-nearest) distance lies
within the proven float32 error bound of the threshold (of the ratio) is recomputed in float64 from
differences, so the accept/reject decisions are those of an exact float64 search. Among index descriptors whose
float32 distances to a query descriptor agree to within rounding, the one chosen may differ from an exact search
(ties of exactly equal distances go to the lowest index). Residuals are evaluated in float32 (float64 for float64
locations) on coordinates centred per candidate, with all candidates grouped by their number of matches (so
padding wastes little work) and the hypotheses in blocks of about :math:`2^{20}` residuals. That bulk pass counts
the squared residuals below a certified upper bound of the squared threshold; the hypotheses whose bound could
beat the best count are then re-counted in float64 (best bound first, usually one per candidate), so every
count is the float64 count: the same on every device and for every chunking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dml_bias._checks import (
    check_dtype,
    check_finite,
    check_has_data,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias._compat import compute_dtype, reduced_precision_fp32_matmul

__all__ = ["spatial_verification"]

#: Minimal sample size of an affine model (and DELG's "at most this many matches gives 0" rule).
_MIN_SAMPLES = 3
#: A 3-point sample is degenerate when |sin| of its angle at the first point is at most this.
_DEGENERATE_SINE = 1e-6
#: Elements of one block of descriptor distances (query features x index features x candidates): 16 MiB float32.
_MATCH_BLOCK_ELEMENTS = 1 << 22
#: Elements of one block of residuals (candidates x hypotheses x matches): 4 MiB float32; small blocks stay in
#: the CPU cache, which makes the RANSAC step several times faster than large ones.
_RANSAC_BLOCK_ELEMENTS = 1 << 20
#: Elements of one block of the exact float64 re-check of borderline descriptor rows.
_RECHECK_BLOCK_ELEMENTS = 1 << 22
#: Candidates are grouped by their number of matches; a group holds sizes down to this fraction of its largest,
#: so padding wastes less than a third of the residual work.
_GROUP_FILL = 0.75


def _matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of a GEMM in ``dtype`` on ``device`` under the current matmul precision settings."""
    if dtype == torch.float64:
        return 2.0**-53
    reduced = reduced_precision_fp32_matmul(device)
    return 2.0**-8 if reduced else 2.0**-24  # TF32 / bf16 inner products: assume bf16's 8-bit significand


def _gamma(n: int, u: float) -> float:
    """Higham's bound ``n u / (1 - n u)`` on the relative error of an ``n``-term dot product."""
    return n * u / (1.0 - n * u) if n * u < 0.5 else math.inf


def _check_features(locations: Any, descriptors: Any, name_loc: str, name_desc: str, dim: int | None) -> int:
    """Check one image's ``(N, 2)`` locations and ``(N, d)`` descriptors; return ``d``."""
    check_tensor(locations, name_loc)
    check_tensor(descriptors, name_desc)
    sizes = check_shape(locations, name_loc, ("N", 2), sources={"N": f"{name_loc}.shape[0]"})
    sizes = check_shape(
        descriptors,
        name_desc,
        ("N", "d"),
        {"N": sizes["N"], **({"d": dim} if dim is not None else {})},
        sources={"N": f"{name_loc}.shape[0]", "d": "query_descriptors.shape[1]"},
    )
    check_dtype(locations, name_loc, "floating")
    check_dtype(descriptors, name_desc, "floating")
    return sizes["d"]


def _pad_index(
    index_locations: Any,
    index_descriptors: Any,
    index_lengths: Any,
    dim: int,
    query_locations: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the candidates (sequences or padded tensors); return padded ``(B, N, 2)``, ``(B, N, d)``, ``(B,)``."""
    device = query_locations.device
    as_sequence = isinstance(index_locations, (list, tuple))
    if as_sequence != isinstance(index_descriptors, (list, tuple)):
        raise TypeError(
            "index_locations and index_descriptors must both be sequences of per-candidate tensors or both be "
            f"padded tensors, got {describe(index_locations)} and {describe(index_descriptors)}"
        )
    if as_sequence:
        if index_lengths is not None:
            raise ValueError("index_lengths is only used with padded index tensors, got it with sequences")
        if len(index_locations) != len(index_descriptors):
            raise ValueError(
                f"index_descriptors must have one tensor per candidate, i.e. {len(index_locations)} "
                f"(len(index_locations)), got {len(index_descriptors)}"
            )
        for b, (loc, desc) in enumerate(zip(index_locations, index_descriptors, strict=True)):
            _check_features(loc, desc, f"index_locations[{b}]", f"index_descriptors[{b}]", dim)
            check_same_device(
                query_locations=query_locations, **{f"index_locations[{b}]": loc, f"index_descriptors[{b}]": desc}
            )
        num = len(index_locations)
        if num == 0:
            return (
                torch.zeros(0, 0, 2, device=device),
                torch.zeros(0, 0, dim, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
            )
        loc_dtype = compute_dtype(*index_locations)
        desc_dtype = compute_dtype(*index_descriptors)
        locations = pad_sequence([loc.to(loc_dtype) for loc in index_locations], batch_first=True)
        descriptors = pad_sequence([desc.to(desc_dtype) for desc in index_descriptors], batch_first=True)
        lengths = torch.tensor([int(loc.shape[0]) for loc in index_locations], dtype=torch.long, device=device)
        return locations, descriptors, lengths
    check_tensor(index_locations, "index_locations")
    check_tensor(index_descriptors, "index_descriptors")
    sizes = check_shape(index_locations, "index_locations", ("B", "N", 2))
    check_shape(
        index_descriptors,
        "index_descriptors",
        ("B", "N", "d"),
        {**sizes, "d": dim},
        sources={"B": "index_locations.shape[0]", "N": "index_locations.shape[1]", "d": "query_descriptors.shape[1]"},
    )
    check_dtype(index_locations, "index_locations", "floating")
    check_dtype(index_descriptors, "index_descriptors", "floating")
    check_same_device(
        query_locations=query_locations,
        index_locations=index_locations,
        index_descriptors=index_descriptors,
    )
    num, width = sizes["B"], sizes["N"]
    if index_lengths is None:
        return index_locations, index_descriptors, torch.full((num,), width, dtype=torch.long, device=device)
    check_tensor(index_lengths, "index_lengths")
    check_dtype(index_lengths, "index_lengths", "integer")
    check_shape(index_lengths, "index_lengths", ("B",), dict(sizes), sources={"B": "index_locations.shape[0]"})
    check_same_device(index_locations=index_locations, index_lengths=index_lengths)
    if index_lengths.numel() and (int(index_lengths.min()) < 0 or int(index_lengths.max()) > width):
        raise ValueError(
            f"index_lengths must lie in [0, {width}] (index_locations.shape[1]), got values in "
            f"[{int(index_lengths.min())}, {int(index_lengths.max())}]"
        )
    lengths = index_lengths.to(torch.long)
    if bool((lengths == width).all()):
        return index_locations, index_descriptors, lengths
    # Rows past a candidate's length may hold anything (NaN included): zero them in a copy.
    valid = (torch.arange(width, device=device) < lengths[:, None])[..., None]
    locations = torch.where(valid, index_locations, torch.zeros((), dtype=index_locations.dtype, device=device))
    descriptors = torch.where(valid, index_descriptors, torch.zeros((), dtype=index_descriptors.dtype, device=device))
    return locations, descriptors, lengths


def _exact_rows(
    query: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    rows: torch.Tensor,
    cands: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact float64 squared distances of query rows ``rows`` to candidates ``cands``: (nearest, its index, second)."""
    width, dim = index.shape[1], index.shape[2]
    step = max(1, _RECHECK_BLOCK_ELEMENTS // max(1, width * dim))
    firsts, idxs, seconds = [], [], []
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], cands[start : start + step]
        diff = index[c].to(torch.float64) - query[r].to(torch.float64)[:, None, :]
        dist = diff.square_().sum(-1).masked_fill_(~valid[c], math.inf)  # (R, N)
        first, idx = dist.min(-1)  # the first minimum: the lowest index among exact ties
        if width > 1:
            dist.scatter_(-1, idx[:, None], math.inf)
            second = dist.min(-1).values
        else:
            second = torch.full_like(first, math.inf)
        firsts.append(first)
        idxs.append(idx)
        seconds.append(second)
    return torch.cat(firsts), torch.cat(idxs), torch.cat(seconds)


def _putative_matches(
    query: torch.Tensor,
    index: torch.Tensor,
    lengths: torch.Tensor,
    threshold: float,
    ratio: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest index descriptor of every query descriptor per candidate and whether the match is kept.

    Returns ``(nearest, accepted)``, both ``(B, M)``: ``nearest`` int64 indices into the candidate's rows.
    """
    dtype = compute_dtype(query, index)
    device = query.device
    num, width, dim = index.shape
    num_query = query.shape[0]
    nearest = torch.zeros(num, num_query, dtype=torch.long, device=device)
    accepted = torch.zeros(num, num_query, dtype=torch.bool, device=device)
    if width == 0:
        return nearest, accepted
    q_t = query.to(dtype).t()
    x = index.to(dtype)
    valid = torch.arange(width, device=device) < lengths[:, None]  # (B, N)
    x_sq = x.square().sum(-1)
    x_sq_masked = x_sq.masked_fill(~valid, math.inf)
    q_sq64 = query.to(torch.float64).square().sum(-1)  # (M,)
    # |fl(|x|^2 - 2 q.x) - (|x|^2 - 2 q.x)| <= gamma_{d+2} (|q| + |x|)^2 (Higham's dot-product bound, with slack).
    gamma = 2.0 * _gamma(dim + 2, _matmul_unit_roundoff(dtype, device))
    q_norm = q_sq64.sqrt()
    x_max = x_sq.to(torch.float64).amax(-1).sqrt()
    thr_sq = threshold * threshold
    ratio_sq = None if ratio is None else ratio * ratio
    step = max(1, _MATCH_BLOCK_ELEMENTS // max(1, num_query * width))
    for start in range(0, num, step):
        stop = min(num, start + step)
        block = stop - start
        # (block, N, M): squared distance minus |q|^2; this layout (reduced over dim 1) is the faster one on CPUs.
        dist = torch.baddbmm(
            x_sq_masked[start:stop, :, None], x[start:stop], q_t.expand(block, dim, num_query), alpha=-2.0
        )
        first, idx = dist.min(1)
        d1 = first.to(torch.float64) + q_sq64
        tol = gamma * (q_norm[None, :] + x_max[start:stop, None]).square()
        keep = d1 < thr_sq
        border = (d1 - thr_sq).abs() <= tol
        if ratio_sq is not None:
            if width > 1:
                dist.scatter_(1, idx[:, None, :], math.inf)
                d2 = dist.min(1).values.to(torch.float64) + q_sq64
            else:
                d2 = torch.full_like(d1, math.inf)
            keep &= d1 < ratio_sq * d2
            border |= (d1 - ratio_sq * d2).abs() <= tol * (1.0 + ratio_sq)
        border &= torch.isfinite(d1)
        cand, rows = border.nonzero(as_tuple=True)
        if cand.numel():
            e1, eidx, e2 = _exact_rows(query, index, valid, rows, cand + start)
            exact_keep = e1 < thr_sq
            if ratio is not None:
                exact_keep &= e1.sqrt() < ratio * e2.sqrt()  # DELG's comparison of distances, in float64
            idx[cand, rows] = eidx
            keep[cand, rows] = exact_keep
        nearest[start:stop] = idx
        accepted[start:stop] = keep
    return nearest, accepted


def _sample_indices(num_matches: torch.Tensor, max_trials: int, seed: int) -> torch.Tensor:
    """``(B, max_trials, 3)`` indices of 3 distinct matches per trial, uniform; drawn on the CPU from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand((num_matches.shape[0], max_trials, 3), generator=generator, dtype=torch.float64)
    uniform = uniform.to(num_matches.device)
    n = num_matches.to(torch.float64)[:, None]
    # Sequential sampling without replacement: the k-th pick is uniform over the n - k matches not yet taken.
    first = (uniform[..., 0] * n).floor().clamp(min=0).minimum((n - 1).clamp_min(0))
    second = (uniform[..., 1] * (n - 1)).floor().clamp(min=0).minimum((n - 2).clamp_min(0))
    second = second + (second >= first).to(second.dtype)
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    third = (uniform[..., 2] * (n - 2)).floor().clamp(min=0).minimum((n - 3).clamp_min(0))
    third = third + (third >= low).to(third.dtype)
    third = third + (third >= high).to(third.dtype)
    return torch.stack([first, second, third], dim=-1).long()


def _affine_hypotheses(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine maps taking each 3-point sample ``src`` (..., 3, 2) to ``dst`` (float64, Cramer's rule).

    Returns the rows ``[a11, a12, t1]`` and ``[a21, a22, t2]`` (each (..., 3)) and the degenerate-sample mask.
    """
    e1, e2 = src[..., 1, :] - src[..., 0, :], src[..., 2, :] - src[..., 0, :]
    f1, f2 = dst[..., 1, :] - dst[..., 0, :], dst[..., 2, :] - dst[..., 0, :]
    det = e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]
    scale = e1.norm(dim=-1) * e2.norm(dim=-1)
    # scikit-image also fails when the three destination points coincide (its normalisation divides by 0).
    same_dst = (f1 == 0).all(-1) & (f2 == 0).all(-1)
    degenerate = (det.abs() <= _DEGENERATE_SINE * scale) | same_dst
    det = torch.where(degenerate, torch.ones_like(det), det)
    # A [e1 e2] = [f1 f2]  =>  A = [f1 f2] [e1 e2]^-1, with the inverse by Cramer's rule.
    a_1 = (f1 * e2[..., 1:2] - f2 * e1[..., 1:2]) / det[..., None]  # first column of A: (a11, a21)
    a_2 = (f2 * e1[..., 0:1] - f1 * e2[..., 0:1]) / det[..., None]  # second column: (a12, a22)
    s0, d0 = src[..., 0, :], dst[..., 0, :]
    t = d0 - a_1 * s0[..., 0:1] - a_2 * s0[..., 1:2]
    row_x = torch.stack([a_1[..., 0], a_2[..., 0], t[..., 0]], dim=-1)
    row_y = torch.stack([a_1[..., 1], a_2[..., 1], t[..., 1]], dim=-1)
    zero = torch.zeros((), dtype=row_x.dtype, device=row_x.device)
    return row_x.where(~degenerate[..., None], zero), row_y.where(~degenerate[..., None], zero), degenerate


def _groups(num_matches: torch.Tensor) -> list[torch.Tensor]:
    """Candidates with more than 3 matches, grouped by similar match counts (largest first)."""
    counts, order = torch.sort(num_matches.cpu(), descending=True, stable=True)
    groups: list[torch.Tensor] = []
    start, total = 0, int((counts > _MIN_SAMPLES).sum())
    while start < total:
        floor = _GROUP_FILL * float(counts[start])
        stop = start + 1
        while stop < total and float(counts[stop]) >= floor:
            stop += 1
        groups.append(order[start:stop].to(num_matches.device))
        start = stop
    return groups


def _residual_bound(
    row_x: torch.Tensor, row_y: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, unit_roundoff: float
) -> torch.Tensor:
    """``(B, T)`` bound on ``|r_fl - r|``: the residual in the compute dtype against the float64 one.

    Each residual coordinate ``a s_x + b s_y + t - q`` is evaluated from rounded parameters and coordinates by a
    3-term GEMM plus a subtraction: its error is at most ``8 u (|a| |s_x| + |b| |s_y| + |t| + |q|)`` (slack
    included); the per-candidate maxima of the coordinates bound every match at once.
    """
    src_max = src.abs().amax(1)  # (B, 2), padding slots are 0
    dst_max = dst.abs().amax(1)
    scale = 8.0 * unit_roundoff
    err_x = row_x[..., 0].abs() * src_max[:, None, 0] + row_x[..., 1].abs() * src_max[:, None, 1] + row_x[..., 2].abs()
    err_y = row_y[..., 0].abs() * src_max[:, None, 0] + row_y[..., 1].abs() * src_max[:, None, 1] + row_y[..., 2].abs()
    return scale * (err_x + dst_max[:, None, 0] + err_y + dst_max[:, None, 1])


def _exact_counts(
    src: torch.Tensor,
    dst: torch.Tensor,
    slot_valid: torch.Tensor,
    row_x: torch.Tensor,
    row_y: torch.Tensor,
    cands: torch.Tensor,
    hyps: torch.Tensor,
    thr_sq: float,
) -> torch.Tensor:
    """Float64 inlier counts of hypotheses ``hyps`` (A, k) of candidates ``cands`` (A,), one op per kernel."""
    width = src.shape[1]
    step = max(1, _RANSAC_BLOCK_ELEMENTS // max(1, hyps.shape[1] * width))
    out = []
    for start in range(0, cands.numel(), step):
        c, h = cands[start : start + step], hyps[start : start + step]
        rows = c[:, None]
        px, py = row_x[rows, h][..., None], row_y[rows, h][..., None]  # (a, k, 3, 1)
        sx, sy = src[c, None, :, 0], src[c, None, :, 1]  # (a, 1, W)
        # Separate multiplications and additions (no fused multiply-add), so every device rounds alike.
        res_x = px[:, :, 0] * sx + px[:, :, 1] * sy + px[:, :, 2] - dst[c, None, :, 0]
        res_y = py[:, :, 0] * sx + py[:, :, 1] * sy + py[:, :, 2] - dst[c, None, :, 1]
        inside = (res_x * res_x + res_y * res_y < thr_sq) & slot_valid[c, None, :]
        out.append(inside.sum(-1))
    return torch.cat(out)


def _ransac_counts(
    query_locations: torch.Tensor,
    index_locations: torch.Tensor,
    nearest: torch.Tensor,
    accepted: torch.Tensor,
    residual_threshold: float,
    max_trials: int,
    seed: int,
    trials_per_chunk: int | None,
) -> torch.Tensor:
    """Largest inlier count over ``max_trials`` affine hypotheses per candidate (0 for at most 3 matches).

    The bulk pass counts, per hypothesis, the residuals below a certified upper bound of the threshold in the
    compute dtype (an upper bound of the float64 count). Per candidate, hypotheses are then re-counted in float64
    in decreasing order of that bound until the best float64 count reaches the next bound, so the result is the
    float64 maximum, whatever the chunking or the device.
    """
    device = query_locations.device
    num = accepted.shape[0]
    num_matches = accepted.sum(1)
    best = torch.zeros(num, dtype=torch.long, device=device)
    if num == 0 or int(num_matches.max()) <= _MIN_SAMPLES:
        return best
    width = int(num_matches.max())
    # The matches of each candidate first, in query order.
    order = torch.sort((~accepted).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    slot_valid = torch.arange(width, device=device) < num_matches[:, None]  # (B, W)
    dst = query_locations.to(torch.float64)[order]  # (B, W, 2)
    src_rows = nearest.gather(1, order)
    src = index_locations.to(torch.float64).gather(1, src_rows[..., None].expand(-1, -1, 2))
    # Centre both sides per candidate: the residuals do not change and float32 keeps more digits.
    weight = slot_valid[..., None].to(torch.float64)
    denom = num_matches.clamp_min(1).to(torch.float64)[:, None]
    src = (src - ((src * weight).sum(1) / denom)[:, None, :]) * weight
    dst = (dst - ((dst * weight).sum(1) / denom)[:, None, :]) * weight

    picks = _sample_indices(num_matches, max_trials, seed)  # (B, T, 3)
    flat = picks.reshape(num, -1)
    sample_src = src.gather(1, flat[..., None].expand(-1, -1, 2)).view(num, max_trials, 3, 2)
    sample_dst = dst.gather(1, flat[..., None].expand(-1, -1, 2)).view(num, max_trials, 3, 2)
    row_x64, row_y64, degenerate = _affine_hypotheses(sample_src, sample_dst)

    dtype = compute_dtype(query_locations, index_locations)
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    delta = _residual_bound(row_x64, row_y64, src, dst, unit)
    # fl(r^2) < (t + delta)^2 (1 + 4u) whenever r < t; widened once more for the rounding of the bound itself.
    upper = ((residual_threshold + delta).square() * (1.0 + 6.0 * unit)).to(dtype)[..., None]  # (B, T, 1)
    row_x, row_y = row_x64.to(dtype), row_y64.to(dtype)
    homogeneous = torch.cat([src, torch.ones_like(src[..., :1])], dim=-1).to(dtype).transpose(1, 2)  # (B, 3, W)
    # Padding slots get an infinite target, so their residual is infinite and never counted.
    target = dst.to(dtype).masked_fill(~slot_valid[..., None], math.inf)
    target_x, target_y = target[..., 0][:, None, :], target[..., 1][:, None, :]  # (B, 1, W)

    bound = torch.full((num, max_trials), -1, dtype=torch.long, device=device)
    for group in _groups(num_matches):
        size = int(num_matches[group[0]])
        trials = trials_per_chunk or max(1, _RANSAC_BLOCK_ELEMENTS // (group.numel() * size))
        trials = min(max_trials, trials)
        cand_step = max(1, _RANSAC_BLOCK_ELEMENTS // (trials * size)) if trials_per_chunk is None else group.numel()
        points = homogeneous[group, :, :size].contiguous()
        tx, ty = target_x[group, :, :size].contiguous(), target_y[group, :, :size].contiguous()
        rx_group, ry_group, upper_group = row_x[group], row_y[group], upper[group]
        counts = torch.empty(group.numel(), max_trials, dtype=torch.long, device=device)
        for c0 in range(0, group.numel(), cand_step):
            c1 = c0 + cand_step
            for t0 in range(0, max_trials, trials):
                t1 = t0 + trials
                res_x = torch.baddbmm(tx[c0:c1], rx_group[c0:c1, t0:t1], points[c0:c1], beta=-1.0)  # A s + t - q
                res_y = torch.baddbmm(ty[c0:c1], ry_group[c0:c1, t0:t1], points[c0:c1], beta=-1.0)
                res_x.mul_(res_x).addcmul_(res_y, res_y)  # squared residuals (candidates, trials, matches)
                counts[c0:c1, t0:t1] = res_x.lt_(upper_group[c0:c1, t0:t1]).sum(-1)  # in place: the fast path
        bound[group] = counts
    bound.masked_fill_(degenerate, -1)

    # Exact float64 counts, best bound first, until no remaining bound can beat the best count found.
    thr_sq = residual_threshold * residual_threshold
    sorted_bound, by_bound = torch.sort(bound, dim=1, descending=True, stable=True)
    active = sorted_bound[:, 0] > 0
    position, step = 0, 1
    while position < max_trials and bool(active.any()):
        cands = active.nonzero().flatten()
        hyps = by_bound[cands, position : position + step]
        exact = _exact_counts(src, dst, slot_valid, row_x64, row_y64, cands, hyps, thr_sq)
        best[cands] = torch.maximum(best[cands], exact.amax(1))
        position += hyps.shape[1]
        if position < max_trials:
            active[cands] = sorted_bound[cands, position] > best[cands]
        step *= 8
    return best


def spatial_verification(
    query_locations: torch.Tensor,
    query_descriptors: torch.Tensor,
    index_locations: Sequence[torch.Tensor] | torch.Tensor,
    index_descriptors: Sequence[torch.Tensor] | torch.Tensor,
    *,
    index_lengths: torch.Tensor | None = None,
    descriptor_threshold: float = 1.0,
    residual_threshold: float = 20.0,
    max_trials: int = 1000,
    ratio_test: float | None = None,
    seed: int = 0,
    trials_per_chunk: int | None = None,
) -> torch.Tensor:
    r"""RANSAC inlier counts of one query image against a batch of candidate images (DELG's verification).

    For each candidate: putative matches by nearest-neighbour descriptor search (distance strictly below
    ``descriptor_threshold``, optionally Lowe's ratio test), 0 if there are at most 3, otherwise the largest
    inlier count over ``max_trials`` affine hypotheses from 3-point samples (residual strictly below
    ``residual_threshold``). See :mod:`dml_bias.retrieval.verification` for the exact rules, the direction of the
    model (index → query, residuals in query pixels, as in DELG) and the numerics.

    All candidates and all hypotheses are evaluated as batched tensor operations (no Python loop over pairs or
    trials): candidates are grouped by their number of matches and evaluated in blocks of about :math:`2^{20}`
    residuals (a few MiB); descriptor distances are computed in blocks of about :math:`2^{22}` entries.

    Args:
        query_locations: ``(M, 2)`` floating-point locations ``(x, y)`` of the query's local features, in pixels.
        query_descriptors: ``(M, d)`` floating-point descriptors of the query's local features.
        index_locations: The candidates' feature locations: a list or tuple of ``B`` tensors ``(N_b, 2)``, or one
            padded ``(B, N, 2)`` tensor (with ``index_lengths``).
        index_descriptors: The candidates' descriptors, in the same layout: ``B`` tensors ``(N_b, d)`` or one
            ``(B, N, d)`` tensor.
        index_lengths: With padded tensors, the ``(B,)`` integer number of valid rows of each candidate (valid
            rows first; the others are ignored, whatever they hold). ``None``: all rows are valid. Must be
            ``None`` for sequences.
        descriptor_threshold: A putative match needs a descriptor distance strictly below this, ``>= 0``;
            ``math.inf`` switches the test off (with ``ratio_test`` this gives DELG's ``use_ratio_test=True``
            mode, where the ratio test replaces the distance test).
        residual_threshold: An inlier's residual must be strictly below this, in pixels, ``>= 0`` (DELG: 20).
        max_trials: Number of RANSAC hypotheses per candidate, ``>= 1`` (DELG: 1000).
        ratio_test: ``None`` (default, as DELG), or :math:`r \in (0, 1]`: also require :math:`d_1 < r\,d_2`.
        seed: Seed of the CPU :class:`torch.Generator` that draws the samples, in ``[-2**63, 2**64 - 1]``; the
            same seed and inputs give the same counts, on any device and for any ``trials_per_chunk``.
        trials_per_chunk: Hypotheses evaluated at once (``None``: chosen from the block size). Changes speed and
            memory only, never the result.

    Returns:
        ``(B,)`` int64 inlier counts on the device of the inputs: 0, or between 3 and the number of putative
        matches.

    Raises:
        TypeError: If an input is not a tensor (or a sequence of tensors), or not floating-point
            (``index_lengths``: not integer), or if one of the index inputs is a sequence and the other a tensor.
        ValueError: On wrong shapes or mismatched lengths or devices, ``index_lengths`` out of range or given
            with sequences, a negative threshold, ``max_trials < 1``, or ``ratio_test`` outside ``(0, 1]``.

    Example:
        >>> import torch
        >>> from dml_bias.retrieval import spatial_verification
        >>> g = torch.Generator().manual_seed(0)
        >>> locations = torch.rand(30, 2, generator=g) * 1000
        >>> descriptors = torch.nn.functional.normalize(torch.randn(30, 64, generator=g), dim=1)
        >>> moved = locations * 0.5 + torch.tensor([10.0, 20.0])  # an affine view: the query at half size
        >>> other = torch.rand(30, 2, generator=g) * 1000  # the same descriptors at random places
        >>> spatial_verification(moved, descriptors, [locations, other], [descriptors, descriptors]).tolist()
        [30, 5]
    """
    check_tensor(query_locations, "query_locations")
    check_tensor(query_descriptors, "query_descriptors")
    check_has_data(query_locations=query_locations, query_descriptors=query_descriptors)
    dim = _check_features(query_locations, query_descriptors, "query_locations", "query_descriptors", None)
    check_same_device(query_locations=query_locations, query_descriptors=query_descriptors)
    device = query_locations.device
    locations, descriptors, lengths = _pad_index(
        index_locations, index_descriptors, index_lengths, dim, query_locations
    )
    # NaN or inf would be matched and fitted silently (NaN descriptors still gave "inliers"). The padded index
    # tensors are checked: rows past a candidate's length are zeros there.
    check_finite(query_locations, "query_locations")
    check_finite(query_descriptors, "query_descriptors")
    check_has_data(index_locations=locations, index_descriptors=descriptors)
    check_finite(locations, "index_locations")
    check_finite(descriptors, "index_descriptors")
    if not (isinstance(descriptor_threshold, (int, float)) and descriptor_threshold == math.inf):
        check_number(descriptor_threshold, "descriptor_threshold", low=0.0)
    check_number(residual_threshold, "residual_threshold", low=0.0)
    check_number(max_trials, "max_trials", low=1, integer=True)
    if ratio_test is not None:
        check_number(ratio_test, "ratio_test", low=0.0, high=1.0, low_inclusive=False)
    check_number(seed, "seed", low=-(2**63), high=2**64 - 1, integer=True)  # what torch.Generator accepts
    if trials_per_chunk is not None:
        check_number(trials_per_chunk, "trials_per_chunk", low=1, integer=True)

    num = locations.shape[0]
    if num == 0 or query_locations.shape[0] == 0:
        return torch.zeros(num, dtype=torch.long, device=device)
    nearest, accepted = _putative_matches(
        query_descriptors,
        descriptors,
        lengths,
        float(descriptor_threshold),
        None if ratio_test is None else float(ratio_test),
    )
    return _ransac_counts(
        query_locations,
        locations,
        nearest,
        accepted,
        float(residual_threshold),
        int(max_trials),
        int(seed),
        trials_per_chunk,
    )
