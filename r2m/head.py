"""R2MHead: the reward-token embedding attends to the policy's hidden states (docs/design.md §1.2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import r2m_kernels
from r2m_kernels.validation import check_finite, check_int, check_scalar, check_tensor, validate_sequences

from .schedule import omega as omega_schedule

HEAD_BACKENDS = ("auto", "eager") + r2m_kernels.BACKENDS


def check_head_backend(backend: str, device) -> None:
    """BackendUnavailableError naming head_backend when a head with this backend (its kernels
    and the GREBT loss that follows it) cannot run on tensors of `device`; "auto" and "eager"
    always can."""
    reason = None if backend in ("auto", "eager") else r2m_kernels.why_unavailable(backend, device=device)
    if reason is not None:
        raise r2m_kernels.BackendUnavailableError(f"head_backend={backend!r} cannot run on {device}: {reason}")


class R2MHead(nn.Module):
    """Trainable attention block plus scoring head on top of a frozen reward model.

        H_hat = MultiHead(q = rte W_q, k = h W_k, v = h W_v) W_o
        H_fin = (1 - omega) H_hat + omega rte,      reward = score(H_fin)

    Backends: "eager" is the formula as written (K and V materialised, the baseline every
    benchmark compares against); "torch", "triton", "cuda" fold the query into W_k
    (q~ = q W_k^T per head) so the only pass over the hidden states is
    r2m_kernels.attention_pool, and take the attended vector to the reward with
    r2m_kernels.score_mix without forming H_fin; "auto" lets each op take the first backend
    that can run its inputs (docs/design.md §7). The head calls those public functions as a
    user would, so their validation and backend choice apply unchanged.

    Parameters stay fp32 unless the module is cast. `rte` and `hidden` may be 16-bit; the
    rewards are fp32.
    """

    def __init__(self, rm_dim: int, policy_dim: int, attn_dim: int = 2048, num_heads: int = 1,
                 omega_floor: float = 0.6, total_steps: int | None = None, backend: str = "auto"):
        super().__init__()
        check_int("rm_dim", rm_dim, low=1)
        check_int("policy_dim", policy_dim, low=1)
        check_int("attn_dim", attn_dim, low=1)
        check_int("num_heads", num_heads, low=1)
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim = {attn_dim} must be divisible by num_heads = {num_heads}")
        self.omega_floor = omega_floor  # validated by the setter
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps, low=1)
        self.backend = backend  # validated by the setter
        self.rm_dim, self.policy_dim, self.attn_dim, self.num_heads = rm_dim, policy_dim, attn_dim, num_heads
        self.q_proj = nn.Linear(rm_dim, attn_dim, bias=False)
        self.k_proj = nn.Linear(policy_dim, attn_dim, bias=False)
        self.v_proj = nn.Linear(policy_dim, attn_dim, bias=False)
        self.o_proj = nn.Linear(attn_dim, rm_dim, bias=False)
        self.score = nn.Linear(rm_dim, 1)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in HEAD_BACKENDS:
            raise ValueError(f"backend must be one of {HEAD_BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def omega_floor(self) -> float:
        return self._omega_floor

    @omega_floor.setter
    def omega_floor(self, value: float) -> None:
        self._omega_floor = check_scalar("omega_floor", value, low=0.0, high=1.0)

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads

    def extra_repr(self) -> str:
        return (f"rm_dim={self.rm_dim}, policy_dim={self.policy_dim}, attn_dim={self.attn_dim}, "
                f"num_heads={self.num_heads}, omega_floor={self.omega_floor}, "
                f"total_steps={self.total_steps}, backend={self.backend!r}")

    @classmethod
    def from_score_head(cls, linear: nn.Linear, policy_dim: int, **kwargs) -> "R2MHead":
        """A head whose score (phi) is a copy of an existing RM score head `linear`
        (in_features = rm_dim, out_features = 1; a missing bias becomes 0). Other keyword
        arguments go to the constructor. The new head lives on linear's device, in fp32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if linear.out_features != 1:
            raise ValueError(f"linear must have out_features = 1 (one reward), got {linear.out_features}")
        head = cls(linear.in_features, policy_dim, **kwargs).to(linear.weight.device)
        with torch.no_grad():
            head.score.weight.copy_(linear.weight)
            head.score.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(1))
        return head

    def resolve_omega(self, step=None, omega=None) -> float:
        """The mixing weight: from `step` (needs total_steps), or `omega` given directly, or,
        with neither, the evaluation weight omega(T) = omega_floor."""
        if step is not None and omega is not None:
            raise ValueError("give step or omega, not both")
        if omega is not None:
            return check_scalar("omega", omega, low=0.0, high=1.0)
        if step is None:
            return self.omega_floor
        if self.total_steps is None:
            raise ValueError("step needs total_steps: construct R2MHead(..., total_steps=T) or pass omega")
        return omega_schedule(step, self.total_steps, self.omega_floor)

    def _check(self, rte, hidden, mask, cu_seqlens) -> None:
        """The head's own checks (rte, policy_dim, devices). The eager backend also validates
        hidden, mask and cu_seqlens here: it calls no attention_pool, which validates them on
        the other backends."""
        if self.backend == "eager":
            batch = validate_sequences(hidden, mask, cu_seqlens)[0]
        else:
            batch = _sequence_count(hidden, mask, cu_seqlens)
        check_tensor("rte", rte, ranks=(2,), device=hidden.device)
        if rte.shape != (batch, self.rm_dim):
            raise ValueError(f"rte must have shape (B, rm_dim) = ({batch}, {self.rm_dim}), got {tuple(rte.shape)}")
        check_finite("rte", rte)
        if hidden.shape[-1] != self.policy_dim:
            raise ValueError(f"hidden's last dimension must be policy_dim = {self.policy_dim}, "
                             f"got {hidden.shape[-1]}")
        if self.q_proj.weight.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but the head's parameters are on "
                             f"{self.q_proj.weight.device}")

    def _attend_eager(self, q, hidden, mask, cu_seqlens):
        """The paper's formula: K and V materialised, (B, S, d) each, in hidden's dtype."""
        hidden, mask = r2m_kernels.padded_sequences(hidden, mask, cu_seqlens)
        b, s, _ = hidden.shape
        n_h, d_h = self.num_heads, self.head_dim
        k = F.linear(hidden, self.k_proj.weight.to(hidden.dtype)).view(b, s, n_h, d_h)
        v = F.linear(hidden, self.v_proj.weight.to(hidden.dtype)).view(b, s, n_h, d_h)
        acc = r2m_kernels.accumulation_dtype(hidden.dtype)
        scores = torch.einsum("bjd,bsjd->bjs", q.to(hidden.dtype), k).to(acc) / math.sqrt(d_h)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.einsum("bjs,bsjd->bjd", weights.to(hidden.dtype), v)

    def _attend_folded(self, q, hidden, mask, cu_seqlens):
        """docs/design.md §2.1: q~_j = q_j W_k[:, j]^T, p_j = attention_pool(h, q~_j), c_j = p_j W_v[:, j]."""
        n_h, d_h = self.num_heads, self.head_dim
        w_k = self.k_proj.weight.view(n_h, d_h, self.policy_dim)
        w_v = self.v_proj.weight.view(n_h, d_h, self.policy_dim)
        q_tilde = torch.einsum("bjd,jdp->bjp", q, w_k)
        pooled = r2m_kernels.attention_pool(hidden, q_tilde, 1.0 / math.sqrt(d_h), mask=mask,
                                            cu_seqlens=cu_seqlens, backend=self.backend)
        return torch.einsum("bjp,jdp->bjd", pooled.to(w_v.dtype), w_v)

    def _attended(self, rte, hidden, mask, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, rte): the attended vector c = concat_j(c_j) (B, attn_dim) and rte, both in the
        parameters' dtype. The one place the inputs are checked."""
        self._check(rte, hidden, mask, cu_seqlens)
        rte = rte.to(self.q_proj.weight.dtype)
        q = self.q_proj(rte).view(rte.shape[0], self.num_heads, self.head_dim)
        attend = self._attend_eager if self.backend == "eager" else self._attend_folded
        c = attend(q, hidden, mask, cu_seqlens)
        return c.reshape(rte.shape[0], self.attn_dim).to(self.o_proj.weight.dtype), rte

    def attend(self, rte, hidden, *, mask=None, cu_seqlens=None) -> torch.Tensor:
        """H_hat (B, rm_dim) in the parameters' dtype: the attention block's output."""
        return self.o_proj(self._attended(rte, hidden, mask, cu_seqlens)[0])

    @torch.no_grad()
    def attention_weights(self, rte, hidden, *, mask=None, cu_seqlens=None) -> torch.Tensor:
        """Where each head looks: a[b, j, t] = softmax_t(q~_j . h_t / sqrt(d_h)) over the valid
        positions, 0 at the others, (B, n_h, S) in the parameters' dtype (at least fp32); each
        row sums to 1 over its valid positions. Plain PyTorch on the folded query whatever the
        backend (a diagnostic, not a fast path; q~_j . h_t = q_j . k_t, so these are the eager
        backend's weights too), without gradient. Arguments as attend's; packed input
        (N, policy_dim) + cu_seqlens comes back padded to the longest sequence, each row's
        positions from its sequence's start."""
        validate_sequences(hidden, mask, cu_seqlens)
        self._check(rte, hidden, mask, cu_seqlens)
        acc = torch.promote_types(self.q_proj.weight.dtype, torch.float32)
        n_h, d_h = self.num_heads, self.head_dim
        q = self.q_proj(rte.to(self.q_proj.weight.dtype)).view(rte.shape[0], n_h, d_h)
        q_tilde = torch.einsum("bjd,jdp->bjp", q, self.k_proj.weight.view(n_h, d_h, self.policy_dim)).to(acc)
        hidden, mask = r2m_kernels.padded_sequences(hidden, mask, cu_seqlens)
        scores = torch.matmul(q_tilde, hidden.to(acc).transpose(1, 2)) / math.sqrt(d_h)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def embed(self, rte, hidden, *, mask=None, cu_seqlens=None, step=None, omega=None) -> torch.Tensor:
        """H_fin = (1 - omega) H_hat + omega rte, (B, rm_dim) in the parameters' dtype.

        rte (B, rm_dim); hidden (B, S, policy_dim) [+ mask (B, S)] or (N, policy_dim) +
        cu_seqlens (B+1,) int32; step or omega as in resolve_omega."""
        w = self.resolve_omega(step, omega)
        h_hat = self.attend(rte, hidden, mask=mask, cu_seqlens=cu_seqlens)
        return (1.0 - w) * h_hat + w * rte.to(h_hat.dtype)

    def forward(self, rte, hidden, *, mask=None, cu_seqlens=None, step=None, omega=None) -> torch.Tensor:
        """Rewards (B,): fp32 (fp64 for a head cast to fp64). At omega = 1 (step 0) this
        equals score(rte) exactly, the original reward model's reward.

        "eager" scores H_fin (embed) as the paper writes it. The other backends never form
        H_fin: r2m_kernels.score_mix takes the attended vector c straight to the reward,
        phi((1 - omega) c W_o^T + omega rte) = (1 - omega) c . (W_o^T w) + omega rte . w + b."""
        omega_t = self.resolve_omega(step, omega)
        if self.backend == "eager":
            rewards = self.score(self.embed(rte, hidden, mask=mask, cu_seqlens=cu_seqlens, omega=omega_t))
            rewards = rewards.squeeze(-1)
            return rewards.to(torch.promote_types(rewards.dtype, torch.float32))
        attended, rte = self._attended(rte, hidden, mask, cu_seqlens)
        # At omega = 1 the torch op is F.linear(rte, 1 * w, b) + 0, bitwise nn.Linear's
        # score(rte); a fused kernel's dot product rounds differently, so omega = 1 (step 0)
        # always takes the torch op, whatever the backend.
        mix_backend = "torch" if omega_t == 1.0 else self.backend
        return r2m_kernels.score_mix(attended, rte, self.o_proj.weight, self.score.weight, self.score.bias,
                                     omega=omega_t, backend=mix_backend)

    def reward_terms(self, rte, hidden, *, mask=None, cu_seqlens=None, step=None,
                     omega=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward split as reward = head term + RM term + b (docs/design.md §1.2): the head
        term (1 - omega) w . H_hat and the RM term omega w . rte, with w the score's weight;
        each (B,) fp32. Arguments as forward's."""
        omega_t = self.resolve_omega(step, omega)
        h_hat = self.attend(rte, hidden, mask=mask, cu_seqlens=cu_seqlens)
        w = self.score.weight.squeeze(0).float()
        return (1.0 - omega_t) * (h_hat.float() @ w), omega_t * (rte.float() @ w)


def _sequence_count(hidden, mask, cu_seqlens) -> int:
    """B from the shapes alone (no sync); malformed inputs get validation's error here."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return hidden.shape[0]
    if (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and isinstance(cu_seqlens, torch.Tensor)
            and cu_seqlens.dim() == 1):
        return cu_seqlens.shape[0] - 1
    return validate_sequences(hidden, mask, cu_seqlens)[0]
