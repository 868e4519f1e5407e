"""Sweep that places attention_pool_many_heads.MANY_HEADS_MIN: both Triton attention-pool variants
(per-head CUDA-core dots, many-head tensor-core dots) at the docs/design.md §6 `heads` size (B 512,
S 1024, D_p 4096, bf16) for n_h in 1..32, side by side in one run: forward, backward into q
alone, backward into q and hidden (median ms of triton.testing.do_bench).

    python benchmarks/pool_variants.py            # on the GPU
    python benchmarks/pool_variants.py --tiny     # CPU smoke run in Triton's interpreter
                                                  # (set TRITON_INTERPRET=1; no timing)
The threshold is the smallest n_h from which the many-head variant is faster in every column.
"""

import argparse

import torch
import triton.testing

import r2m_kernels
from r2m_kernels.triton import attention_pool_many_heads

def sweep(batch, seq_len, d_p, heads, device, dtype, timer):
    """Rows (n_h, variant, fwd ms, bwd-dq ms, bwd-dq+dhidden ms)."""
    hidden = torch.randn(batch, seq_len, d_p, device=device, dtype=dtype)
    hidden_g = hidden.detach().clone().requires_grad_()
    rows = []
    for n_h in heads:
        q = torch.randn(batch, n_h, d_p, device=device, requires_grad=True)
        for variant in ("many-heads", "per-head"):
            # The backward chooses its variant again, so the timers run inside the scope too.
            with attention_pool_many_heads.forced_variant(variant):
                def forward(h=hidden):
                    return r2m_kernels.attention_pool(h, q, d_p ** -0.5, backend="triton")

                out, out_g = forward(), forward(hidden_g)
                grad = torch.randn_like(out)
                rows.append((n_h, variant, timer(forward),
                             timer(lambda: torch.autograd.grad(out, q, grad, retain_graph=True)),
                             timer(lambda: torch.autograd.grad(out_g, (q, hidden_g), grad,
                                                               retain_graph=True))))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run (no timing)")
    args = parser.parse_args(argv)
    if args.tiny:
        def run_once(fn):
            fn()
            return float("nan")
        rows = sweep(2, 40, 48, (1, 4), "cpu", torch.float32, run_once)
    else:
        rows = sweep(512, 1024, 4096, (1, 2, 4, 8, 16, 32), "cuda", torch.bfloat16,
                     triton.testing.do_bench)
    print(f"{'n_h':>3} {'variant':8} {'fwd ms':>8} {'bwd dq ms':>10} {'bwd dq+dh ms':>13}")
    for n_h, variant, fwd, bwd, bwd_dh in rows:
        print(f"{n_h:3d} {variant:8} {fwd:8.3f} {bwd:10.3f} {bwd_dh:13.3f}")
    return rows


if __name__ == "__main__":
    main()
