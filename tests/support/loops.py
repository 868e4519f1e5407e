"""Independent float64 implementations, written as plain loops straight from docs/design.md §1.2–1.3.

They share no code with the package, so a wrong sign, scale or mask in the package cannot be
copied into its own reference. Slow on purpose: use small shapes.
"""

import math

import torch


def valid_positions(seq_len, mask_row):
    return [t for t in range(seq_len) if mask_row is None or bool(mask_row[t])]


def attention_pool_loop(hidden, q, scale, mask=None):
    """hidden (B, S, D), q (B, H, D), mask (B, S) or None -> (B, H, D) float64, via autograd-able
    per-position operations."""
    hidden, q = hidden.double(), q.double()
    b_count, s_count, _ = hidden.shape
    out = []
    for b in range(b_count):
        ts = valid_positions(s_count, None if mask is None else mask[b])
        heads = []
        for j in range(q.shape[1]):
            scores = torch.stack([scale * torch.dot(q[b, j], hidden[b, t]) for t in ts])
            m = scores.max()
            e = torch.exp(scores - m)
            a = e / e.sum()
            heads.append(sum(a[i] * hidden[b, t] for i, t in enumerate(ts)))
        out.append(torch.stack(heads))
    return torch.stack(out)


def r2m_head_loop(params, rte, hidden, num_heads, omega, mask=None):
    """The paper's formula per sequence, per head, per position, in float64.

    params: dict of W_q (D_rm, d), W_k (D_p, d), W_v (D_p, d), W_o (d, D_rm), w (D_rm,), b ().
    Returns rewards (B,)."""
    p = {k: v.double() for k, v in params.items()}
    rte, hidden = rte.double(), hidden.double()
    d = p["W_q"].shape[1]
    d_h = d // num_heads
    rewards = []
    for b in range(rte.shape[0]):
        ts = valid_positions(hidden.shape[1], None if mask is None else mask[b])
        q = rte[b] @ p["W_q"]
        context = []
        for j in range(num_heads):
            cols = slice(j * d_h, (j + 1) * d_h)
            keys = [hidden[b, t] @ p["W_k"][:, cols] for t in ts]
            values = [hidden[b, t] @ p["W_v"][:, cols] for t in ts]
            scores = torch.stack([torch.dot(q[cols], k) / math.sqrt(d_h) for k in keys])
            e = torch.exp(scores - scores.max())
            a = e / e.sum()
            context.append(sum(a[i] * values[i] for i in range(len(ts))))
        h_hat = torch.cat(context) @ p["W_o"]
        h_fin = (1 - omega) * h_hat + omega * rte[b]
        rewards.append(torch.dot(p["w"], h_fin) + p["b"])
    return torch.stack(rewards)


def attention_weights_loop(params, rte, hidden, num_heads, mask=None):
    """The paper's attention weights a_t = softmax_t(q_j . k_t / sqrt(d_h)) per sequence, per
    head, per position, in float64, from W_q and W_k as written (keys materialised). params as
    r2m_head_loop's. Returns (B, n_h, S), 0 at masked positions."""
    W_q, W_k = params["W_q"].double(), params["W_k"].double()
    rte, hidden = rte.double(), hidden.double()
    d_h = W_q.shape[1] // num_heads
    out = torch.zeros(rte.shape[0], num_heads, hidden.shape[1], dtype=torch.float64)
    for b in range(rte.shape[0]):
        ts = valid_positions(hidden.shape[1], None if mask is None else mask[b])
        q = rte[b] @ W_q
        for j in range(num_heads):
            cols = slice(j * d_h, (j + 1) * d_h)
            scores = [torch.dot(q[cols], hidden[b, t] @ W_k[:, cols]).item() / math.sqrt(d_h) for t in ts]
            top = max(scores)
            e = [math.exp(x - top) for x in scores]
            for t, x in zip(ts, e):
                out[b, j, t] = x / sum(e)
    return out


def grebt_loop(rewards, groups, alpha, eps=1e-6):
    """Per-group GREBT losses (list of float64 scalars) for rewards (B,) and groups, a list of
    (start, end) index pairs. Differentiable through autograd except for the pair selection."""
    r = rewards.double()
    losses = []
    for start, end in groups:
        g = [r[i] for i in range(start, end)]
        k = len(g)
        values = [float(x.detach()) for x in g]
        w = values.index(max(values))
        l = values.index(min(values))
        bt = -torch.log(torch.sigmoid(g[w] - g[l]))
        mean = sum(g) / k
        var = sum((x - mean) ** 2 for x in g) / k
        std = torch.sqrt(var) if float(var.detach()) > 0 else var * 0.0
        z = [(x - mean) / (std + eps) for x in g]
        zmax = max(float(x.detach()) for x in z)
        e = [torch.exp(x - zmax) for x in z]
        total = sum(e)
        probs = [x / total for x in e]
        gre = -sum(pj * torch.log(pj) for pj in probs if float(pj.detach()) > 0)
        losses.append((1 - alpha) * bt + alpha * gre)
    return losses
