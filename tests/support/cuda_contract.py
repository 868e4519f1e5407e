"""A plain-PyTorch model of the launchers in csrc/r2m_cuda.h, loops and all, standing in for
the compiled module r2m_kernels._cuda. It lets the CPU test suite check the cuda backend's
host side (scale folding, split combine, dq scaling, autograd, reductions) against the
contract the kernels implement; the kernels themselves are tested on the GPU. It makes the
checks csrc/binding.cpp makes (dtypes, contiguity, sizes), with the same exception types, so
host code that hands the binding what it refuses fails here too."""

from concurrent.futures import ThreadPoolExecutor

import torch

from r2m_kernels.reference import grebt_loss_torch

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(ok, message):
    """TORCH_CHECK: a RuntimeError."""
    if not ok:
        raise RuntimeError(message)


def _check_storage(t, name):
    """binding.cpp's storage_dtype: TORCH_CHECK_TYPE, a TypeError."""
    if t.dtype not in STORAGE_DTYPES:
        raise TypeError(f"backend='cuda' takes {name} in float32, float16 or bfloat16, got {t.dtype}")


def _check_pool_problem(hidden, q_scaled, mask, cu_seqlens, n_split):
    """binding.cpp's pool_problem and r2m_cuda.h's PoolProblem limits."""
    _check_storage(hidden, "hidden")
    _check(hidden.stride(-1) == 1, "hidden must have a contiguous last dim")
    _check(q_scaled.dtype == torch.float32 and q_scaled.is_contiguous(), "q_scaled must be contiguous float32")
    _check(n_split >= 1, f"n_split must be >= 1, got {n_split}")
    if cu_seqlens is not None:
        _check(hidden.dim() == 2 and cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous(),
               "packed hidden (N, D) needs contiguous int32 cu_seqlens")
        batch = cu_seqlens.numel() - 1
    else:
        _check(hidden.dim() == 3, "padded hidden must be (B, S, D)")
        batch = hidden.shape[0]
    _check(q_scaled.shape[0] == batch and q_scaled.shape[2] == hidden.shape[-1], "q must be (B, n_h, D)")
    _check(1 <= hidden.shape[-1] <= 16384 and 1 <= q_scaled.shape[1] <= 64, "1 <= D <= 16384, 1 <= n_h <= 64")
    if mask is not None:
        _check(tuple(mask.shape) == tuple(hidden.shape[:2]), "mask must be (B, S)")


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
        _check_pool_problem(hidden, q_scaled, mask, cu_seqlens, n_split)
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
                                softmax_scale, n_split, need_dhidden):
        self.calls.append(("attention_pool_backward", n_split))
        _check_pool_problem(hidden, q_scaled, mask, cu_seqlens, n_split)
        for t in (grad, lse, delta):
            _check(t.dtype == torch.float32 and t.is_contiguous(), "grad, lse and delta must be contiguous float32")
        batch, heads, dim = q_scaled.shape
        _check(grad.numel() == batch * heads * dim and lse.numel() == delta.numel() == batch * heads,
               "grad must be (B, n_h, D), lse and delta (B, n_h)")
        seqs = _sequences(hidden, mask, cu_seqlens)
        dq = torch.zeros(n_split, *q_scaled.shape)
        dh_rows = torch.zeros(hidden.shape[:-1].numel(), hidden.shape[-1])
        for b, (rows, index, valid) in enumerate(seqs):
            for s, (lo, hi) in enumerate(_chunks(rows.shape[0], n_split)):
                # Invalid rows are never read (they may hold NaN): zeros stand in for them.
                h = torch.where(valid[lo:hi, None], rows[lo:hi].float(), 0.0)
                # Weight 0 at invalid rows, not exp(0 - lse) (inf for lse < -88) times 0.
                attn = torch.where(valid[lo:hi], torch.exp(q_scaled[b] @ h.T - lse[b][:, None]), 0.0)  # (n_h, L)
                ds = attn * (grad[b] @ h.T - delta[b][:, None])
                dq[s, b] = (ds * softmax_scale) @ h  # scaled before the products, as the kernel
                dh_rows[index[lo:hi]] = ds.T @ q_scaled[b] + attn.T @ grad[b]
        dhidden = dh_rows.view(hidden.shape).to(hidden.dtype) if need_dhidden else hidden.new_empty(0)
        return dq, dhidden

    def grebt_loss_forward(self, rewards, group_size, cu_groups, num_groups, max_group_size,
                           alpha, eps, loss_scale, write_grad):
        self.calls.append(("grebt_loss_forward", max_group_size))
        _check(rewards.dim() == 1 and rewards.is_contiguous(), "rewards must be contiguous (B,)")
        _check_storage(rewards, "rewards")
        if cu_groups is not None:
            _check(cu_groups.dtype == torch.int32 and cu_groups.is_contiguous()
                   and cu_groups.numel() == num_groups + 1, "cu_groups must be contiguous int32 (G+1,)")
        _check(max_group_size <= 16384, "max_group_size <= 16384 (r2m_cuda.h)")
        size = None if cu_groups is not None else group_size
        # The binding clamps alpha and eps to float's range before the kernel sees them.
        alpha, eps = (min(x, torch.finfo(torch.float32).max) for x in (alpha, eps))

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
