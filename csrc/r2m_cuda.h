// The launchers of the `cuda` backend: plain CUDA C++, no torch headers, so every .cu file
// compiles with nvcc alone (CI compiles them for sm_90 on machines without a GPU). The torch
// binding (binding.cpp) checks and prepares tensors, calls these, and raises on an error.
//
// Conventions shared by every launcher:
//   - pointers are device pointers; element strides are in elements, not bytes;
//   - math and accumulation are fp32 whatever the storage dtype;
//   - a launcher never synchronises; it returns cudaGetLastError() after its launches.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace r2m {

// Storage dtype of `hidden` / `rewards` (fp64 is not a `cuda` backend dtype).
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// attention_pool (docs/design.md §2):
//   pooled[b, j] = sum_t softmax_t(q_scaled[b, j] . h[b, t]) h[b, t]      over valid t
//
// Layout of hidden: padded (B, S, D) with row stride stride_hs and batch stride stride_hb and
// an optional uint8 mask (nonzero = valid), or packed (N, D) rows with int32 cu_seqlens (B+1,)
// (then seq_len = 0, stride_hb unused, mask = nullptr). The last dim of hidden is contiguous
// (stride 1); the binding guarantees it. hidden is 16-byte aligned at its base pointer;
// rows may not be (the kernels check alignment before using 16-byte vector loads).
//
// Flash-decoding: the positions of each sequence are cut into n_split contiguous chunks of
// chunk = roundup(ceil(len / n_split), 16) positions (whole 16-row granules, so every
// rows-per-iteration the kernels use divides it); the last chunks may be short or empty.
struct PoolProblem {
  const void* hidden;
  Dtype dtype;
  int64_t batch;      // B
  int64_t seq_len;    // S for padded hidden, 0 for packed
  int64_t dim;        // D (D_p), 1 <= D <= 16384
  int64_t heads;      // n_h, 1 <= n_h <= 64
  int64_t stride_hb;  // elements between sequences (padded only)
  int64_t stride_hs;  // elements between rows
  const int32_t* cu_seqlens;  // (B+1,) or nullptr (padded)
  const uint8_t* mask;        // (B, S) or nullptr
  int64_t stride_mb, stride_ms;
  const float* q_scaled;  // (B, n_h, D) contiguous fp32, the softmax scale already folded in
  float softmax_scale;    // backward only: the scale folded into q_scaled, for dq
  int n_split;            // >= 1
};

// out (n_split, B, n_h, D) contiguous fp32: each split's softmax-normalised partial output;
// lse (n_split, B, n_h) contiguous fp32: each split's log-sum-exp of the scores. A split with
// no valid position writes 0 and -inf. The binding combines the splits (one split: out is the
// result, lse the final log-sum-exp).
cudaError_t attention_pool_forward(const PoolProblem& p, float* out, float* lse,
                                   cudaStream_t stream);

// Backward. grad (B, n_h, D) contiguous fp32 = dL/dpooled; lse (B, n_h) the combined
// log-sum-exp; delta (B, n_h) = sum_d grad * pooled. Writes:
//   dq (n_split, B, n_h, D) contiguous fp32: each split's sum_t (softmax_scale ds_tj) h_t, with
//       a_tj = exp(q_scaled_j . h_t - lse_j), ds_tj = a_tj (grad_j . h_t - delta_j); the scale
//       multiplies ds before the products, so the sums cannot overflow where dq does not
//       (the binding sums the splits);
//   dhidden, unless nullptr: contiguous rows (B*S or N, D) in hidden's dtype, every row written
//       (zeros at invalid positions), dh_t = sum_j (ds_tj q_scaled_j + a_tj grad_j). Each row
//       is owned by one block (which sums the heads), so there are no atomics.
cudaError_t attention_pool_backward(const PoolProblem& p, const float* grad, const float* lse,
                                    const float* delta, float* dq, void* dhidden,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// GREBT loss (docs/design.md §1.3), per group of rewards, fp32 math:
//   loss_g = (1 - alpha) softplus(r_l - r_w) + alpha H(softmax(z)),
//   z = (r - mean) / (population std + eps), w / l = first index of the max / min.
// Same semantics and gradient as r2m_kernels/triton/grebt.py (its docstring has the formulas;
// a group of equal rewards has std 0 and no gradient through the std). Rewards of any finite
// magnitude: z is computed in units of the group's largest |r| rounded down to a power of two.
struct GrebtProblem {
  const void* rewards;  // (n,) contiguous
  Dtype dtype;
  int64_t num_groups;   // G
  int64_t group_size;   // K for uniform groups; 0 when cu_groups is given
  const int32_t* cu_groups;  // (G+1,) offsets of ragged groups, or nullptr
  int64_t max_group_size;    // largest group (= group_size when uniform), <= 16384
  float alpha, eps;
  float loss_scale;  // multiplies the loss and gradient (1/G for "mean", else 1)
};

// loss (G,) fp32; grad (n,) fp32 = d(loss_scale * sum_g loss_g)/dr, or nullptr to skip it.
cudaError_t grebt_loss_forward(const GrebtProblem& p, float* loss, float* grad,
                               cudaStream_t stream);

}  // namespace r2m
