"""A plain-PyTorch model of the launchers in csrc/r2m_cuda.h, loops and all, standing in for
the compiled module r2m_kernels._cuda. It lets the CPU test suite check the cuda backend's
host side (scale folding, split combine, dq scaling, autograd, reductions) against the
contract the kernels implement; the kernels themselves are tested on the GPU."""

from concurrent.futures import ThreadPoolExecutor

import torch

from r2m_kernels.reference import grebt_loss_torch


def _sequences(hidden, mask, cu_seqlens):
    """[(rows (L, D) of a sequence, their row indices in hidden's row layout, valid (L,))]."""
    if cu_seqlens is not None:
        out = []
        for b in range(cu_seqlens.numel() - 1):
            lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
            out.append((hidden[lo:hi], torch.arange(lo, hi), torch.ones(hi - lo, dtype=torch.bool)))
        return out
    batch, seq_len = hidden.shape[:2]
    valid = torch.ones(batch, seq_len, dtype=torch.bool) if mask is None else mask != 0
    return [(hidden[b], b * seq_len + torch.arange(seq_len), valid[b]) for b in range(batch)]


def _chunks(length, n_split):
    """r2m_cuda.h's flash-decoding chunks: ceil(length / n_split) rounded up to 16 positions."""
    chunk = -(-(-(-length // n_split)) // 16) * 16
    return [(min(s * chunk, length), min((s + 1) * chunk, length)) for s in range(n_split)]


class FakeExtension:
    """attention_pool_forward / attention_pool_backward / grebt_loss_forward as documented in
    csrc/r2m_cuda.h and bound by csrc/binding.cpp, in fp32 loops. `calls` records (name, n_split)."""

    def __init__(self):
        self.calls = []

    def attention_pool_forward(self, hidden, q_scaled, mask, cu_seqlens, n_split):
        self.calls.append(("attention_pool_forward", n_split))
        seqs = _sequences(hidden, mask, cu_seqlens)
        heads, dim = q_scaled.shape[1:]
        out = torch.zeros(n_split, len(seqs), heads, dim)
        lse = torch.full((n_split, len(seqs), heads), float("-inf"))
        for b, (rows, _, valid) in enumerate(seqs):
            for s, (lo, hi) in enumerate(_chunks(rows.shape[0], n_split)):
                keep = valid[lo:hi]
                if not keep.any():
                    continue
                h = rows[lo:hi][keep].float()
                scores = q_scaled[b] @ h.T  # (n_h, L)
                lse[s, b] = torch.logsumexp(scores, dim=1)
                out[s, b] = torch.softmax(scores, dim=1) @ h
        return out, lse

    def attention_pool_backward(self, hidden, q_scaled, mask, cu_seqlens, grad, lse, delta,
                                n_split, need_dhidden):
        self.calls.append(("attention_pool_backward", n_split))
        seqs = _sequences(hidden, mask, cu_seqlens)
        dq = torch.zeros(n_split, *q_scaled.shape)
        dh_rows = torch.zeros(hidden.shape[:-1].numel(), hidden.shape[-1])
        for b, (rows, index, valid) in enumerate(seqs):
            for s, (lo, hi) in enumerate(_chunks(rows.shape[0], n_split)):
                h = rows[lo:hi].float() * valid[lo:hi, None]
                attn = torch.exp(q_scaled[b] @ h.T - lse[b][:, None]) * valid[lo:hi]  # (n_h, L)
                ds = attn * (grad[b] @ h.T - delta[b][:, None])
                dq[s, b] = ds @ h
                dh_rows[index[lo:hi]] = ds.T @ q_scaled[b] + attn.T @ grad[b]
        dhidden = dh_rows.view(hidden.shape).to(hidden.dtype) if need_dhidden else hidden.new_empty(0)
        return dq, dhidden

    def grebt_loss_forward(self, rewards, group_size, cu_groups, num_groups, max_group_size,
                           alpha, eps, loss_scale, write_grad):
        self.calls.append(("grebt_loss_forward", max_group_size))
        size = None if cu_groups is not None else group_size

        def loss_and_grad():
            r = rewards.float().detach().requires_grad_(True)
            loss = grebt_loss_torch(r, size, cu_groups, alpha, eps, "none") * loss_scale
            return loss.detach(), torch.autograd.grad(loss.sum(), r)[0]

        # A custom op's forward runs with autograd's dispatch key excluded, a thread-local
        # setting: a fresh thread differentiates the reference normally.
        with ThreadPoolExecutor(1) as pool:
            loss, grad = pool.submit(loss_and_grad).result()
        assert loss.shape == (num_groups,)
        return loss, grad if write_grad else grad.new_empty(0)
