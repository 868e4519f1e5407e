"""Every bad input of DESIGN §3 raises ValueError or TypeError naming the argument."""

import pytest
import torch

import r2m_kernels
from r2m import GREBTLoss, R2MHead
from r2m_kernels import BackendUnavailableError, attention_pool, finite_checks, grebt_loss

B, S, D, H = 3, 5, 8, 2
I32 = torch.int32


def pool_args(**overrides):
    args = {"hidden": torch.randn(B, S, D), "q": torch.randn(B, H, D), "scale": 0.5,
            "mask": None, "cu_seqlens": None}
    args.update(overrides)
    return args


def packed(**overrides):
    return pool_args(**{"hidden": torch.randn(7, D), "cu_seqlens": torch.tensor([0, 2, 3, 7], dtype=I32),
                        **overrides})


def no_valid_row():
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1] = False
    return mask


POOL_CASES = {
    "hidden not a tensor": (pool_args(hidden=[[1.0]]), TypeError, "hidden"),
    "hidden 1-D": (pool_args(hidden=torch.randn(D)), ValueError, "hidden"),
    "hidden 4-D": (pool_args(hidden=torch.randn(B, S, D, 1)), ValueError, "hidden"),
    "hidden integer": (pool_args(hidden=torch.ones(B, S, D, dtype=torch.int64)), TypeError, "hidden"),
    "hidden S = 0": (pool_args(hidden=torch.randn(B, 0, D)), ValueError, "hidden"),
    "hidden B = 0": (pool_args(hidden=torch.randn(0, S, D), q=torch.randn(0, H, D)), ValueError, "hidden"),
    "hidden D = 0": (pool_args(hidden=torch.randn(B, S, 0), q=torch.randn(B, H, 0)), ValueError, "hidden"),
    "q 2-D": (pool_args(q=torch.randn(B, D)), ValueError, "q"),
    "q wrong B": (pool_args(q=torch.randn(B + 1, H, D)), ValueError, "q"),
    "q wrong D": (pool_args(q=torch.randn(B, H, D + 1)), ValueError, "q"),
    "q no heads": (pool_args(q=torch.randn(B, 0, D)), ValueError, "q"),
    "q integer": (pool_args(q=torch.ones(B, H, D, dtype=torch.int32)), TypeError, "q"),
    "q on another device": (pool_args(q=torch.randn(B, H, D, device="meta")), ValueError, "q"),
    "scale NaN": (pool_args(scale=float("nan")), ValueError, "scale"),
    "scale a string": (pool_args(scale="0.5"), TypeError, "scale"),
    "scale a tensor": (pool_args(scale=torch.tensor([0.5, 0.5])), TypeError, "scale"),
    "mask wrong shape": (pool_args(mask=torch.ones(B, S + 1, dtype=torch.bool)), ValueError, "mask"),
    "mask transposed": (pool_args(mask=torch.ones(S, B, dtype=torch.bool)), ValueError, "mask"),
    "mask float": (pool_args(mask=torch.ones(B, S)), TypeError, "mask"),
    "mask not a tensor": (pool_args(mask=[[1] * S] * B), TypeError, "mask"),
    "mask row with no valid position": (pool_args(mask=no_valid_row()), ValueError, "mask"),
    "mask on another device": (pool_args(mask=torch.ones(B, S, dtype=torch.bool, device="meta")), ValueError, "mask"),
    "mask with packed hidden": (packed(mask=torch.ones(7, dtype=torch.bool)), ValueError, "mask"),
    "cu_seqlens with padded hidden": (pool_args(cu_seqlens=torch.tensor([0, 5, 10, 15], dtype=I32)), ValueError, "cu_seqlens"),
    "packed without cu_seqlens": (pool_args(hidden=torch.randn(7, D)), ValueError, "cu_seqlens"),
    "cu_seqlens int64": (packed(cu_seqlens=torch.tensor([0, 2, 3, 7])), TypeError, "cu_seqlens"),
    "cu_seqlens 2-D": (packed(cu_seqlens=torch.tensor([[0, 2], [3, 7]], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens one entry": (packed(cu_seqlens=torch.tensor([0], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens not from 0": (packed(cu_seqlens=torch.tensor([1, 2, 3, 7], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens not ending at N": (packed(cu_seqlens=torch.tensor([0, 2, 3, 6], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens decreasing": (packed(cu_seqlens=torch.tensor([0, 3, 2, 7], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens empty sequence": (packed(cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=I32)), ValueError, "cu_seqlens"),
    "cu_seqlens B disagrees with q": (packed(cu_seqlens=torch.tensor([0, 3, 7], dtype=I32)), ValueError, "q"),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_attention_pool_rejects(case):
    args, exc, word = POOL_CASES[case]
    with pytest.raises(exc, match=word):
        attention_pool(args.pop("hidden"), args.pop("q"), args.pop("scale"), backend="torch", **args)


def test_non_finite_rte_rejected_by_the_head_when_checking():
    rte = torch.randn(B, 6)
    rte[1, 2] = float("nan")
    for backend in ("eager", "torch"):
        with finite_checks(), pytest.raises(ValueError, match="rte"):
            R2MHead(6, D, 4, 2, backend=backend)(rte, torch.randn(B, S, D))


@pytest.mark.parametrize("name, where", [("hidden", (1, 2, 3)), ("q", (0, 1, 4))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_rejected_when_checking(name, where, bad):
    args = pool_args()
    args[name][where] = bad
    with finite_checks(), pytest.raises(ValueError, match=name):
        attention_pool(args["hidden"], args["q"], 0.5, backend="torch")
    rewards = torch.randn(6)
    rewards[2] = bad
    with finite_checks(), pytest.raises(ValueError, match="rewards"):
        grebt_loss(rewards, 3)


def test_finite_checks_are_off_by_default_and_restored():
    hidden = torch.randn(B, S, D)
    hidden[0, 0, 0] = float("nan")
    with finite_checks():
        with finite_checks(False):
            attention_pool(hidden, torch.randn(B, H, D), 0.5, backend="torch")
        with pytest.raises(ValueError):
            attention_pool(hidden, torch.randn(B, H, D), 0.5, backend="torch")


def test_backend_names():
    args = pool_args()
    with pytest.raises(ValueError, match="backend"):
        attention_pool(args["hidden"], args["q"], 0.5, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        grebt_loss(torch.randn(4), 2, backend="eager")  # eager is a head backend only
    # An explicit backend that cannot run here says so; it never falls back silently.
    with pytest.raises(BackendUnavailableError, match="cuda"):
        attention_pool(args["hidden"], args["q"], 0.5, backend="cuda")
    assert "torch" in r2m_kernels.available_backends()
    assert "torch" in r2m_kernels.available_backends("grebt_loss", "cpu")


R = torch.randn(12)
GREBT_CASES = {
    "rewards 2-D": ((torch.randn(3, 4), 4), {}, ValueError, "rewards"),
    "rewards integer": ((torch.ones(8, dtype=torch.int64), 4), {}, TypeError, "rewards"),
    "rewards empty": ((torch.randn(0), 1), {}, ValueError, "rewards"),
    "rewards a list": (([1.0, 2.0], 2), {}, TypeError, "rewards"),
    "group_size does not divide B": ((R, 5), {}, ValueError, "group_size"),
    "group_size 0": ((R, 0), {}, ValueError, "group_size"),
    "group_size float": ((R, 4.0), {}, TypeError, "group_size"),
    "neither group_size nor cu_groups": ((R,), {}, ValueError, "group_size"),
    "both group_size and cu_groups": ((R, 4), {"cu_groups": torch.tensor([0, 12], dtype=I32)}, ValueError, "cu_groups"),
    "cu_groups int64": ((R,), {"cu_groups": torch.tensor([0, 5, 12])}, TypeError, "cu_groups"),
    "cu_groups not ending at B": ((R,), {"cu_groups": torch.tensor([0, 5, 11], dtype=I32)}, ValueError, "cu_groups"),
    "cu_groups not from 0": ((R,), {"cu_groups": torch.tensor([2, 5, 12], dtype=I32)}, ValueError, "cu_groups"),
    "cu_groups empty group": ((R,), {"cu_groups": torch.tensor([0, 5, 5, 12], dtype=I32)}, ValueError, "cu_groups"),
    "alpha above 1": ((R, 4), {"alpha": 1.5}, ValueError, "alpha"),
    "alpha below 0": ((R, 4), {"alpha": -0.1}, ValueError, "alpha"),
    "alpha NaN": ((R, 4), {"alpha": float("nan")}, ValueError, "alpha"),
    "eps zero": ((R, 4), {"eps": 0.0}, ValueError, "eps"),
    "eps negative": ((R, 4), {"eps": -1e-6}, ValueError, "eps"),
    "reduction unknown": ((R, 4), {"reduction": "max"}, ValueError, "reduction"),
}


@pytest.mark.parametrize("case", GREBT_CASES)
def test_grebt_loss_rejects(case):
    args, kwargs, exc, word = GREBT_CASES[case]
    with pytest.raises(exc, match=word):
        grebt_loss(*args, backend="torch", **kwargs)


HEAD_CTOR_CASES = {
    "total_steps 0": ({"total_steps": 0}, ValueError, "total_steps"),
    "attn_dim not divisible": ({"attn_dim": 10, "num_heads": 3}, ValueError, "attn_dim"),
    "omega_floor above 1": ({"omega_floor": 1.2}, ValueError, "omega_floor"),
    "rm_dim 0": ({"rm_dim": 0}, ValueError, "rm_dim"),
    "policy_dim float": ({"policy_dim": 8.0}, TypeError, "policy_dim"),
    "unknown backend": ({"backend": "flash"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", HEAD_CTOR_CASES)
def test_head_constructor_rejects(case):
    overrides, exc, word = HEAD_CTOR_CASES[case]
    kwargs = {"rm_dim": 6, "policy_dim": D, "attn_dim": 4, "num_heads": 2, **overrides}
    with pytest.raises(exc, match=word):
        R2MHead(**kwargs)


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("rte, hidden, kwargs, exc, word", [
    (torch.randn(B, 7), torch.randn(B, S, D), {}, ValueError, "rte"),
    (torch.randn(B + 1, 6), torch.randn(B, S, D), {}, ValueError, "rte"),
    (torch.randn(B, 6), torch.randn(B, S, D + 1), {}, ValueError, "policy_dim"),
    (torch.randn(B, 6), torch.randn(B, S, D), {"mask": no_valid_row()}, ValueError, "mask"),
    (torch.randn(B, 6, dtype=torch.float64).int(), torch.randn(B, S, D), {}, TypeError, "rte"),
    (torch.randn(B, 6, device="meta"), torch.randn(B, S, D), {}, ValueError, "rte"),
])
def test_head_forward_rejects(backend, rte, hidden, kwargs, exc, word):
    head = R2MHead(6, D, 4, 2, backend=backend)
    with pytest.raises(exc, match=word):
        head(rte, hidden, **kwargs)


def test_grebt_module_rejects():
    with pytest.raises(ValueError, match="alpha"):
        GREBTLoss(alpha=2.0)
    with pytest.raises(ValueError, match="reduction"):
        GREBTLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        GREBTLoss(backend="eager")
