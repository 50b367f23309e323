"""Logit distillation across tokenizers (`train --phase hsd --kd-weight β --kd-loss uld|mapped`).

At an aligned pair (s, t) both models have read exactly the same text (teacher_cache/align.py), so the teacher's
next-token distribution at t (its top-k log-probs, stored by `teacher_cache build --logits-topk k`) and the student's
at s describe the same continuation, in two vocabularies that share no ids. Two ways to compare them:

- `uld`, Universal Logit Distillation (Boizard et al., 2024): the Wasserstein-1 distance between the two probability
  vectors sorted in decreasing order, which needs no vocabulary map. With top-k only on the teacher's side, the
  student's k largest probabilities are compared rank by rank and the rest of each distribution as one tail bin:

      L_uld = Σ_{i<k} |p_s^(i) - p_t^(i)| + |(1 - Σ_{i<k} p_s^(i)) - (1 - Σ_{i<k} p_t^(i))|

  The tail term is the least the full sorted distance can add beyond rank k (|Σ a_i - Σ b_i| ≤ Σ |a_i - b_i|), so
  L_uld is a lower bound of the paper's loss, exact when k covers either vocabulary, and 0 only when the top k and
  the tail mass agree.
- `mapped`: KL(q_t ‖ q_s) over the teacher's top-k tokens whose decoded string equals one student token
  (teacher_cache/vocab_map.py, stored with the cache), both sides renormalized over that mapped support:

      q_t(j) = p_t(j) / Σ_mapped p_t,   log q_s(j) = log p_s(m(j)) - logsumexp_mapped log p_s(m(·))

  A position with no mapped token counts for nothing; the covered share Σ_mapped p_t is logged.

Each function returns a sum over positions (weight 0 for padding): the step divides by the batch's KD positions.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx

KD_LOSSES = ("uld", "mapped")


def uld_sum(logits: mx.array, t_logp: mx.array, weight: mx.array) -> mx.array:
    """Σ_i w_i L_uld,i — logits [P, V] (student, at the aligned positions), t_logp [P, k] (teacher, sorted
    descending), weight [P]."""
    k = t_logp.shape[-1]
    p_s = mx.softmax(logits.astype(mx.float32), axis=-1)  # [P, V]
    top = mx.stop_gradient(mx.argpartition(-p_s, kth=k - 1, axis=-1)[:, :k])  # the k largest, unordered
    vals = mx.take_along_axis(p_s, top, axis=-1)  # [P, k]
    order = mx.stop_gradient(mx.argsort(-vals, axis=-1))
    s_sorted = mx.take_along_axis(vals, order, axis=-1)  # [P, k], descending
    p_t = mx.exp(t_logp)
    head = mx.abs(s_sorted - p_t).sum(-1)
    tail = mx.abs((1.0 - s_sorted.sum(-1)) - (1.0 - p_t.sum(-1)))
    return ((head + tail) * weight).sum()


def mapped_sum(logits: mx.array, t_logp: mx.array, s_ids: mx.array, mask: mx.array,
               weight: mx.array) -> Tuple[mx.array, mx.array]:
    """(Σ_i w_i KL_i, Σ_i w_i covered_i) — logits [P, V], t_logp [P, k], s_ids [P, k] (the student id of each teacher
    token; any valid id where unmapped), mask [P, k] (1: mapped), weight [P] (0 for padding and for positions with
    nothing mapped)."""
    logp_s = logits.astype(mx.float32)
    logp_s = logp_s - mx.logsumexp(logp_s, axis=-1, keepdims=True)  # [P, V]
    g = mx.take_along_axis(logp_s, s_ids, axis=-1)  # [P, k]
    neg = mx.array(-1e30, mx.float32)
    g = mx.where(mask > 0, g, neg)
    log_qs = g - mx.logsumexp(g, axis=-1, keepdims=True)
    t = mx.where(mask > 0, t_logp, neg)
    log_qt = t - mx.logsumexp(t, axis=-1, keepdims=True)
    q_t = mx.exp(log_qt) * mask
    kl = (q_t * (mx.where(mask > 0, log_qt, 0.0) - mx.where(mask > 0, log_qs, 0.0))).sum(-1)  # [P]
    covered = (mx.exp(t_logp) * mask).sum(-1)
    return (kl * weight).sum(), (covered * weight).sum()
