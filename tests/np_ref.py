"""Independent float64 NumPy references, written from the papers' formulas."""

import math
from fractions import Fraction

import numpy as np


def log_softmax(x, temperature=1.0, vocab_size=None):
  x = np.asarray(x, np.float64) / temperature
  if vocab_size is not None:
    x = x[..., :vocab_size]  # a padded vocab is simply cut off here
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_logp(lp, lq):
  """KL(P||Q) from log-probs; terms with p == 0 count 0."""
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(p > 0, p * (lp - lq), 0.0), -1)


def kl_prob(p, q):
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), -1)


def divergence(name, s, t, temperature=1.0, vocab_size=None, beta=0.5, alpha=0.1):
  ls, lt = log_softmax(s, temperature, vocab_size), log_softmax(t, temperature, vocab_size)
  ps, pt = np.exp(ls), np.exp(lt)
  if name == "fkl":
    return kl_logp(lt, ls)
  if name == "rkl":
    return kl_logp(ls, lt)
  if name == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  if name == "jsd":
    if beta == 0:
      return kl_logp(lt, ls)
    if beta == 1:
      return kl_logp(ls, lt)
    m = beta * pt + (1 - beta) * ps
    return beta * kl_prob(pt, m) + (1 - beta) * kl_prob(ps, m)
  if name == "skl":
    if alpha == 0:
      return kl_logp(lt, ls)
    return kl_prob(pt, alpha * pt + (1 - alpha) * ps)
  if name == "srkl":
    if alpha == 0:
      return kl_logp(ls, lt)
    return kl_prob(ps, alpha * ps + (1 - alpha) * pt)
  raise KeyError(name)


def masked_mean(values, mask, mode):
  values, mask = np.asarray(values, np.float64), np.asarray(mask, bool)
  if mode == "token":
    return values[mask].mean() if mask.any() else 0.0
  rows = [values[b][mask[b]].mean() for b in range(values.shape[0]) if mask[b].any()]
  return float(np.mean(rows)) if rows else 0.0


def tkd_dkd(s, t, targets, temperature=1.0, vocab_size=None, base="fkl"):
  """Per-token TKD, DKD (base fkl: KL(T||S) pieces; rkl: KL(S||T)) and u = 1 - p_T(g)."""
  ps = np.exp(log_softmax(s, temperature, vocab_size))
  pt = np.exp(log_softmax(t, temperature, vocab_size))
  shp = targets.shape
  ps, pt, g = ps.reshape(-1, ps.shape[-1]), pt.reshape(-1, pt.shape[-1]), targets.reshape(-1)
  tkd, dkd, u = [], [], []
  for i in range(len(g)):
    a, b = (pt[i], ps[i]) if base == "fkl" else (ps[i], pt[i])
    others = np.arange(a.size) != g[i]
    tkd.append(kl_prob(np.array([a[g[i]], 1 - a[g[i]]]), np.array([b[g[i]], 1 - b[g[i]]])))
    dkd.append(kl_prob(a[others] / a[others].sum(), b[others] / b[others].sum()))
    u.append(1 - pt[i][g[i]])
  return (np.array(tkd).reshape(shp), np.array(dkd).reshape(shp), np.array(u).reshape(shp))


def atkd_hard_mask(u, mask, hard_fraction=0.5, split="batch"):
  """The official ATKD rule by brute force: per group (the whole batch, or each row for
  split "sequence") sort the valid u ascending; threshold = sorted[j] with j = (n-1)//2
  for hard_fraction 0.5 (torch.median's lower middle), else floor((1-hf)*(n-1)) in
  exact decimal arithmetic; hard = valid & (u >= threshold)."""
  u, mask = np.asarray(u, np.float64), np.asarray(mask, bool)
  shape = u.shape
  if split == "batch":
    u, mask = u.reshape(1, -1), mask.reshape(1, -1)
  hard = np.zeros(u.shape, bool)
  for r in range(u.shape[0]):
    vals = sorted(float(u[r, i]) for i in range(u.shape[1]) if mask[r, i])
    n = len(vals)
    if n == 0:
      continue
    if hard_fraction == 0.5:
      j = (n - 1) // 2
    else:
      j = math.floor((1 - Fraction(str(hard_fraction))) * (n - 1))
    for i in range(u.shape[1]):
      hard[r, i] = bool(mask[r, i]) and u[r, i] >= vals[j]
  return hard.reshape(shape)


def atkd_loss(s, t, targets, mask, easy_weight=0.2, hard_fraction=0.5, split="batch",
              base="fkl", temperature=1.0, vocab_size=None):
  tkd, dkd, u = tkd_dkd(s, t, targets, temperature, vocab_size, base)
  mask = np.asarray(mask, bool)
  hard = atkd_hard_mask(u, mask, hard_fraction, split)
  easy = mask & ~hard
  l_easy = dkd[easy].mean() if easy.any() else 0.0
  l_hard = (tkd + dkd)[hard].mean() if hard.any() else 0.0
  return easy_weight * l_easy + (1 - easy_weight) * l_hard
