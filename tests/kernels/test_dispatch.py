"""Backend dispatch (docs/design.md §7): per op, "auto" takes the first backend of the
preference order whose probes accept *these* inputs, so it never picks one that then refuses
them; an explicit backend that cannot run raises BackendUnavailableError naming why; and
why_unavailable / available_backends answer per op and device type.

Without a GPU the GPU's preference order is exercised on CPU tensors: the cuda backend runs
through the contract model (tests/support/backends.py) and AUTO_ORDER's CPU entry is replaced by the
order under test, so the backend auto picks actually runs the inputs."""

import pytest
import torch

import r2m_kernels
from r2m import R2MHead
from r2m_kernels import BackendUnavailableError, dispatch
from r2m_kernels.triton import attention_pool as triton_pool
from r2m_kernels.triton import common as triton_common
from r2m_kernels.validation import validate_attention_pool, validate_grebt, validate_score_mix



def pool_call(d_p=8, heads=2, dtype=torch.float32):
    hidden, q = torch.randn(2, 3, d_p, dtype=dtype), torch.randn(2, heads, d_p, dtype=dtype)
    return (hidden, q, 0.5), {}


def grebt_call(groups=((0, 4), (4, 8)), dtype=torch.float32):
    cu = torch.tensor([0] + [end for _, end in groups], dtype=torch.int32)
    return (torch.randn(int(cu[-1]), dtype=dtype),), {"cu_groups": cu}


def score_mix_call():
    return (torch.randn(3, 4), torch.randn(3, 5), torch.randn(5, 4), torch.randn(1, 5), torch.randn(1)), {"omega": 0.3}


OPS = {"attention_pool": (r2m_kernels.attention_pool, validate_attention_pool, ("mask", "cu_seqlens")),
       "grebt_loss": (r2m_kernels.grebt_loss, validate_grebt, ("group_size", "cu_groups", "alpha", "eps", "reduction")),
       "score_mix": (r2m_kernels.score_mix, validate_score_mix, ("omega",))}

DEFAULTS = {"mask": None, "cu_seqlens": None, "group_size": None, "cu_groups": None, "alpha": 0.3,
            "eps": 1e-6, "reduction": "mean"}

# (op, case, call, {backend that refuses: a word of its reason}).
REFUSALS = [
    ("attention_pool", "D_p 16385", lambda: pool_call(d_p=16385), {"triton": "D_p <= 16384", "cuda": "D_p <= 16384"}),
    ("attention_pool", "fp64 hidden", lambda: pool_call(dtype=torch.float64), {"cuda": "float64"}),
    ("attention_pool", "65 heads", lambda: pool_call(heads=65), {"cuda": "n_h <= 64"}),
    ("grebt_loss", "a group of 16385", lambda: grebt_call(((0, 3), (3, 16388))),
     {"triton": "groups of up to 16384", "cuda": "groups of up to 16384"}),
    ("grebt_loss", "fp64 rewards", lambda: grebt_call(dtype=torch.float64), {"cuda": "float64"}),
    ("attention_pool", "accepted by all", pool_call, {}),
    ("grebt_loss", "accepted by all", grebt_call, {}),
    ("score_mix", "accepted by all", score_mix_call, {}),
]
IDS = [f"{op}-{case}" for op, case, _, _ in REFUSALS]


def validated(op, call):
    """validation's record of a call's arguments: what dispatch.resolve sees."""
    fn, validate, options = OPS[op]
    args, kwargs = call
    return validate(*args, *({**DEFAULTS, **kwargs}[name] for name in options))


def orders(op, refusing):
    """The GPU's preference order, and every order that puts the refusing backends first."""
    gpu = dispatch.AUTO_ORDER["cuda"][op]
    rest = [b for b in gpu if b not in refusing]
    return [gpu] + [tuple(refusing) + tuple(rest[i:] + rest[:i]) for i in range(len(rest))]


@pytest.mark.interpreter
@pytest.mark.parametrize("op,case,make_call,refusing", REFUSALS, ids=IDS)
def test_auto_never_picks_a_backend_that_then_refuses(op, case, make_call, refusing, cuda_contract,
                                                     monkeypatch):
    fn = OPS[op][0]
    args, kwargs = make_call()
    want = fn(*(a.double() if isinstance(a, torch.Tensor) else a for a in args), **kwargs, backend="torch")
    for order in orders(op, refusing):
        monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], op, order)
        name, _ = dispatch.resolve(op, "auto", validated(op, (args, kwargs)))
        assert name == next(b for b in order if b not in refusing), order
        got = fn(*args, **kwargs, backend="auto")  # runs: the pick accepts the inputs
        torch.testing.assert_close(got.double(), want.to(got.device), rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("op,case,make_call,refusing", [r for r in REFUSALS if r[3]],
                         ids=[i for i, r in zip(IDS, REFUSALS) if r[3]])
def test_an_explicit_backend_that_cannot_run_says_why(op, case, make_call, refusing, cuda_contract):
    fn = OPS[op][0]
    args, kwargs = make_call()
    for backend, reason in refusing.items():
        with pytest.raises(BackendUnavailableError, match=reason):
            fn(*args, **kwargs, backend=backend)


class _ReportsCuda:
    """Mixed into an inputs record so that it reports a CUDA device (its tensors stay on the
    CPU): dispatch's answer for the GPU, asked on a machine without one."""
    __slots__ = ()

    @property
    def device(self):
        return torch.device("cuda")


@pytest.mark.parametrize("op,case,make_call,refusing", REFUSALS, ids=IDS)
def test_auto_on_a_gpu_takes_the_first_backend_of_the_gpu_order_that_accepts(op, case, make_call, refusing):
    inputs = validated(op, make_call())
    on_cuda = type("OnCuda", (_ReportsCuda, type(inputs)), {"__slots__": ()})(*inputs)
    runs_on_cuda = r2m_kernels.available_backends(op, "cuda")  # this machine: no extension
    name, _ = dispatch.resolve(op, "auto", on_cuda)
    assert name == next(b for b in dispatch.AUTO_ORDER["cuda"][op] if b in runs_on_cuda and b not in refusing)


@pytest.mark.parametrize("op,case,make_call,refusing", REFUSALS[-3:], ids=IDS[-3:])
def test_triton_without_the_interpreter_refuses_cpu_tensors(op, case, make_call, refusing, monkeypatch):
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], op, dispatch.AUTO_ORDER["cuda"][op])
    fn = OPS[op][0]
    args, kwargs = make_call()
    assert dispatch.resolve(op, "auto", validated(op, (args, kwargs)))[0] == "torch"
    fn(*args, **kwargs, backend="auto")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        fn(*args, **kwargs, backend="triton")
    assert "triton" not in r2m_kernels.available_backends(op, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_on_the_cpu_is_the_torch_backend(op):
    """The interpreter is for tests, not speed: auto on CPU tensors is torch, every op."""
    call = next(make() for o, case, make, _ in REFUSALS if o == op and case == "accepted by all")
    assert "triton" in r2m_kernels.available_backends(op, "cpu")
    assert dispatch.resolve(op, "auto", validated(op, call))[0] == "torch"


def test_cuda_on_cpu_tensors_says_so():
    hidden, q = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors; got tensors on cpu"):
        r2m_kernels.attention_pool(hidden, q, 0.5, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        r2m_kernels.grebt_loss(torch.randn(8), 4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        r2m_kernels.score_mix(*score_mix_call()[0], omega=0.5, backend="cuda")
    head = R2MHead(8, 8, attn_dim=4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        head(torch.randn(2, 8), hidden, omega=0.5)
    assert "cuda" not in r2m_kernels.available_backends(device="cpu")


@pytest.mark.interpreter
def test_why_unavailable_and_available_backends():
    assert r2m_kernels.why_unavailable("torch") is None
    assert "needs CUDA tensors" in r2m_kernels.why_unavailable("cuda", "grebt_loss", "cpu")
    assert "r2m_kernels._cuda" in r2m_kernels.why_unavailable("cuda", "attention_pool", "cuda")
    assert r2m_kernels.why_unavailable("triton", device="cuda") is None  # compiles for a GPU
    assert r2m_kernels.available_backends() == ["torch", "triton"]  # the interpreter is on here
    assert r2m_kernels.available_backends("score_mix", torch.device("cuda")) == ["torch", "triton"]


def test_registered_implementations():
    assert dispatch.implementation("attention_pool", "triton") is triton_pool.attention_pool_triton
    assert dispatch.implementation("grebt_loss", "torch") is r2m_kernels.reference.grebt_loss_torch
    # On CUDA tensors "auto" tries triton first (benchmarks/RESULTS.md records what the order rests on).
    assert all(dispatch.AUTO_ORDER["cuda"][op][0] == "triton" for op in dispatch.OPS)


def test_backend_names():
    hidden, q = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="backend"):
        r2m_kernels.attention_pool(hidden, q, 0.5, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        r2m_kernels.grebt_loss(torch.randn(4), 2, backend="eager")  # eager is a head backend only
    with pytest.raises(ValueError, match="backend"):
        r2m_kernels.score_mix(*score_mix_call()[0], omega=0.5, backend=None)
