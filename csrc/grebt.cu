// GREBT loss (docs/design.md §1.3) and its gradient in one launch. The contract is r2m_cuda.h; the
// semantics, formulas and edge cases are those of r2m_kernels/triton/grebt.py (its docstring
// derives the gradient).
//
// A team of threads owns one group: a warp for groups of up to 512 rewards (several warps per
// block, one group each), a whole 512-thread block above that (up to 16384). Each thread keeps
// SLOTS rewards in registers, element j = slot * team_width + rank (so loads and stores are
// coalesced), and every statistic is a team all-reduce: warp shuffles, plus one round through
// shared memory between the warps of a block team. The group is read once and written once.

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "r2m_cuda.h"

namespace r2m {
namespace {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;   // warp teams: four groups per 128-thread block
constexpr int kBlockThreads = 512;  // block teams
constexpr int kBlockWarps = kBlockThreads / kWarpSize;
constexpr int kMaxGroupSize = 16384;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The first all-reduce: the first index of the rewards' max and min. A slot without a reward
// holds (-inf, +inf, INT_MAX), which never beats a reward (rewards are finite: validated) and
// keeps the index tie-break well defined.
struct Extremes {
  float max;
  int argmax;
  float min;
  int argmin;
};

// Two sums reduced together (one round of shuffles and barriers instead of two).
struct SumPair {
  float first, second;
};

__device__ __forceinline__ float combine(float a, float b) { return a + b; }

__device__ __forceinline__ SumPair combine(SumPair a, SumPair b) {
  return {a.first + b.first, a.second + b.second};
}

// Symmetric in (a, b), ties going to the lower index: both lanes of a butterfly step compute
// the same result, so every lane ends with the same (w, l).
__device__ __forceinline__ Extremes combine(Extremes a, Extremes b) {
  const bool b_max = b.max > a.max || (b.max == a.max && b.argmax < a.argmax);
  const bool b_min = b.min < a.min || (b.min == a.min && b.argmin < a.argmin);
  return {b_max ? b.max : a.max, b_max ? b.argmax : a.argmax,
          b_min ? b.min : a.min, b_min ? b.argmin : a.argmin};
}

__device__ __forceinline__ float shfl_xor(float x, int mask) {
  return __shfl_xor_sync(kFullWarp, x, mask);
}

__device__ __forceinline__ SumPair shfl_xor(SumPair x, int mask) {
  return {shfl_xor(x.first, mask), shfl_xor(x.second, mask)};
}

__device__ __forceinline__ Extremes shfl_xor(Extremes x, int mask) {
  return {shfl_xor(x.max, mask), __shfl_xor_sync(kFullWarp, x.argmax, mask),
          shfl_xor(x.min, mask), __shfl_xor_sync(kFullWarp, x.argmin, mask)};
}

// Butterfly all-reduce: every lane gets the result, bit for bit the same (fp addition is
// commutative). All 32 lanes must call it; lanes without rewards bring the identity.
template <class Part>
__device__ __forceinline__ Part warp_allreduce(Part x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) x = combine(x, shfl_xor(x, mask));
  return x;
}

// Block all-reduce: warp butterflies, then every thread combines the warps' partials in the
// same order, so all threads agree bit for bit. `scratch` is raw shared memory for one Extremes
// (the largest part) per warp, reused by every all-reduce of the block.
template <class Part>
__device__ __forceinline__ Part block_allreduce(Part x, unsigned char* scratch) {
  static_assert(sizeof(Part) <= sizeof(Extremes) && alignof(Part) <= alignof(Extremes),
                "scratch holds one Extremes per warp");
  Part* partials = reinterpret_cast<Part*>(scratch);
  x = warp_allreduce(x);
  if (threadIdx.x % kWarpSize == 0) partials[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  x = partials[0];
#pragma unroll 1  // unrolled, all the partials would be live in registers at once
  for (int warp = 1; warp < kBlockWarps; ++warp) x = combine(x, partials[warp]);
  __syncthreads();  // every thread has read the partials before the next all-reduce writes them
  return x;
}

// One group's loss and gradient, computed by a team of kWidth threads; this thread is `rank`.
// Every thread of the team runs every all-reduce (the one early return is launch-uniform).
template <typename T, int SLOTS, bool kBlockTeam>
__device__ __forceinline__ void grebt_group(const GrebtProblem& p, float* loss, float* grad,
                                            int64_t group, int rank, unsigned char* scratch) {
  constexpr int kWidth = kBlockTeam ? kBlockThreads : kWarpSize;
  auto allreduce = [scratch](auto x) {
    if constexpr (kBlockTeam) {
      return block_allreduce(x, scratch);
    } else {
      return warp_allreduce(x);
    }
  };

  int64_t start;
  int size;
  if (p.cu_groups != nullptr) {
    start = p.cu_groups[group];
    size = p.cu_groups[group + 1] - p.cu_groups[group];
  } else {
    start = group * p.group_size;
    size = static_cast<int>(p.group_size);
  }
  // Out of contract (an empty group, or one larger than max_group_size): read and write no
  // reward, and a NaN loss rather than one that silently ignores rewards. A select, not an
  // early return: a data-dependent branch around the shuffles makes ptxas add a divergent
  // fallback path (and a stack frame) to every one of them.
  const bool in_contract = size >= 1 && size <= SLOTS * kWidth;
  if (!in_contract) size = 0;
  const T* rewards = static_cast<const T*>(p.rewards) + start;
  const float count = static_cast<float>(size);

  // Pass 1: load; the pair w / l = first index of the max / min. This thread meets its
  // indices in increasing order, so strict comparisons keep the first.
  float c[SLOTS];  // this thread's rewards, scaled and centred in passes 2-4; 0 past the end
  Extremes ext{-INFINITY, INT_MAX, INFINITY, INT_MAX};
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int j = s * kWidth + rank;
    c[s] = 0.0f;
    if (j < size) {
      const float r = to_float(rewards[j]);
      c[s] = r;
      if (r > ext.max) {
        ext.max = r;
        ext.argmax = j;
      }
      if (r < ext.min) {
        ext.min = r;
        ext.argmin = j;
      }
    }
  }
  ext = allreduce(ext);

  // Pass 2: scale to u = r 2^-e, 2^e the largest |r| rounded down to a power of two (e in
  // [-126, 126], so 2^e and 2^-e are normal), and sum. The product is exact, |u| < 4, so no
  // sum or square overflows, and z = (u - mean u) / (std u + eps 2^-e) is the z of r; eps
  // 2^-e is kept within the normal range (r2m_kernels/reference.py: inverse_group_scale).
  const float magnitude = fmaxf(ext.max, -ext.min);
  const int exponent = min(max(((__float_as_int(magnitude) >> 23) & 0xff) - 127, -126), 126);
  const float inv_scale = __int_as_float((127 - exponent) << 23);
  const float eps_scaled = fminf(fmaxf(p.eps * inv_scale, FLT_MIN), FLT_MAX);
  float sum = 0.0f;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    if (s * kWidth + rank < size) {
      c[s] *= inv_scale;
      sum += c[s];
    }
  }
  const float mean = allreduce(sum) / count;

  // Pass 3: centre. The rounded mean leaves sum c = K delta, delta ~ ulp(mean), which matters
  // when the std is not much larger than ulp(mean): recentring by c_mean = delta (in pass 4)
  // keeps c_hat, and so the gradient, orthogonal to 1, and the variance is the corrected
  // two-pass one, (sum c^2 - (sum c)^2 / K) / K. A group of equal rewards has std 0 (or a
  // tiny one with all c equal; either way z is uniform and g = 0 exactly).
  SumPair centred{0.0f, 0.0f};  // (sum c, sum c^2)
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    if (s * kWidth + rank < size) {
      c[s] -= mean;
      centred.first += c[s];
      centred.second += c[s] * c[s];
    }
  }
  centred = allreduce(centred);
  const float c_mean = centred.first / count;
  const float var = (centred.second - centred.first * c_mean) / count;
  const bool positive = var > 0.0f;
  const float std_dev = positive ? sqrtf(var) : 0.0f;
  const float inv_d = 1.0f / (std_dev + eps_scaled);
  // z = c / d is non-decreasing in r (each step rounds monotonically), so max z is z_w, bit
  // for bit, without another reduction; __fmul_rn keeps z out of an FMA so that t = z - max z
  // is exactly 0 at w and <= 0 elsewhere.
  const float z_max = __fmul_rn((ext.max * inv_scale - mean) - c_mean, inv_d);

  // Pass 4: entropy of softmax(z) as H = log S0 - sum p t, S0 = sum e^t >= 1 (t_w = 0).
  SumPair soft{0.0f, 0.0f};  // (S0, sum e^t t)
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    if (s * kWidth + rank < size) {
      c[s] -= c_mean;
      const float t = __fmul_rn(c[s], inv_d) - z_max;
      const float e = expf(t);
      soft.first += e;
      soft.second += e * t;
    }
  }
  soft = allreduce(soft);
  const float log_s0 = logf(soft.first);
  const float inv_s0 = 1.0f / soft.first;
  const float entropy = log_s0 - soft.second * inv_s0;

  // Bradley-Terry on the pair: gap = r_l - r_w <= 0, so e^gap <= 1 cannot overflow and
  // log1p keeps softplus(gap) accurate when it is tiny. gap overflows only to -inf, where bt
  // and sig are 0, their exact values.
  const float e_gap = expf(ext.min - ext.max);
  const float bt = log1pf(e_gap);
  const float sig = e_gap / (1.0f + e_gap);  // sigmoid(r_l - r_w)
  if (rank == 0) {
    loss[group] = in_contract ? ((1.0f - p.alpha) * bt + p.alpha * entropy) * p.loss_scale : NAN;
  }
  if (grad == nullptr) return;

  // Pass 5: g = dH/dz = -p (log p + H), log p = t - log S0; its mean and its mean against
  // c_hat = c / std (c = 0 when std = 0, where the std is given no gradient). g is computed
  // again in pass 6 rather than held: SLOTS fewer registers for one more exp per reward.
  const auto entropy_grad_z = [&](float c_s) {
    const float t = __fmul_rn(c_s, inv_d) - z_max;
    return -(expf(t) * inv_s0) * (t - log_s0 + entropy);
  };
  const float inv_std = positive ? 1.0f / std_dev : 1.0f;
  SumPair moments{0.0f, 0.0f};  // (sum g, sum g c_hat)
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    if (s * kWidth + rank < size) {
      const float g = entropy_grad_z(c[s]);
      moments.first += g;
      moments.second += g * (c[s] * inv_std);
    }
  }
  moments = allreduce(moments);
  const float g_mean = moments.first / count;
  const float gc_mean = moments.second / count;
  // dH/du = [g - mean(g) - c_hat gc_mean] / d + (eps / d^2) c_hat gc_mean (eps and d in units
  // of 2^e): the eps term (the whole gradient when K = 2) is added on its own, not as a
  // difference of O(g / d) terms. dH/dr = 2^-e dH/du.
  const float eps_term = eps_scaled * inv_d * gc_mean;
  const float entropy_weight = p.alpha * inv_scale * inv_d;  // <= 1 / eps: no overflow
  const float bt_weight = (1.0f - p.alpha) * sig;
  float* grad_group = grad + start;
  // Pass 6: the gradient.
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int j = s * kWidth + rank;
    if (j < size) {
      const float c_hat = c[s] * inv_std;
      const float projected = entropy_grad_z(c[s]) - g_mean - c_hat * gc_mean;
      const float grad_entropy = projected + c_hat * eps_term;
      // BT: -sigmoid at w, +sigmoid at l; they cancel when w = l (K = 1, equal rewards).
      const float pair = static_cast<float>(j == ext.argmin) - static_cast<float>(j == ext.argmax);
      grad_group[j] = (entropy_weight * grad_entropy + bt_weight * pair) * p.loss_scale;
    }
  }
}

template <typename T, int SLOTS>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
    grebt_warp_kernel(const GrebtProblem p, float* loss, float* grad) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (group >= p.num_groups) return;  // warp-uniform: shuffles still see all 32 lanes
  grebt_group<T, SLOTS, false>(p, loss, grad, group, threadIdx.x % kWarpSize, nullptr);
}

template <typename T, int SLOTS>
__global__ void __launch_bounds__(kBlockThreads)
    grebt_block_kernel(const GrebtProblem p, float* loss, float* grad) {
  __shared__ __align__(16) unsigned char scratch[kBlockWarps * sizeof(Extremes)];
  grebt_group<T, SLOTS, true>(p, loss, grad, blockIdx.x, threadIdx.x, scratch);
}

template <typename T, int SLOTS>
void launch_warp_teams(const GrebtProblem& p, float* loss, float* grad, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((p.num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock);
  grebt_warp_kernel<T, SLOTS><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(p, loss, grad);
}

template <typename T, int SLOTS>
void launch_block_teams(const GrebtProblem& p, float* loss, float* grad, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(p.num_groups);
  grebt_block_kernel<T, SLOTS><<<blocks, kBlockThreads, 0, stream>>>(p, loss, grad);
}

// The smallest team and power-of-two SLOTS that hold the largest group: SLOTS is a register
// array size, so it is a compile-time choice among five warp and five block instantiations.
template <typename T>
void launch(const GrebtProblem& p, float* loss, float* grad, cudaStream_t stream) {
  const int64_t k = p.max_group_size;
  if (k <= 32) return launch_warp_teams<T, 1>(p, loss, grad, stream);
  if (k <= 64) return launch_warp_teams<T, 2>(p, loss, grad, stream);
  if (k <= 128) return launch_warp_teams<T, 4>(p, loss, grad, stream);
  if (k <= 256) return launch_warp_teams<T, 8>(p, loss, grad, stream);
  if (k <= 512) return launch_warp_teams<T, 16>(p, loss, grad, stream);
  if (k <= 1024) return launch_block_teams<T, 2>(p, loss, grad, stream);
  if (k <= 2048) return launch_block_teams<T, 4>(p, loss, grad, stream);
  if (k <= 4096) return launch_block_teams<T, 8>(p, loss, grad, stream);
  if (k <= 8192) return launch_block_teams<T, 16>(p, loss, grad, stream);
  return launch_block_teams<T, 32>(p, loss, grad, stream);
}

}  // namespace

cudaError_t grebt_loss_forward(const GrebtProblem& problem, float* loss, float* grad,
                               cudaStream_t stream) {
  const bool uniform = problem.cu_groups == nullptr;
  if (problem.rewards == nullptr || loss == nullptr || problem.num_groups < 1 ||
      problem.num_groups > INT_MAX ||  // one block or warp per group: the grid's x limit
      problem.max_group_size < 1 || problem.max_group_size > kMaxGroupSize ||
      (uniform && (problem.group_size < 1 || problem.group_size > problem.max_group_size))) {
    return cudaErrorInvalidValue;
  }
  // eps needs no clamp here: the kernel keeps eps 2^-e within the normal range (pass 2).
  switch (problem.dtype) {
    case Dtype::kFloat32:
      launch<float>(problem, loss, grad, stream);
      break;
    case Dtype::kFloat16:
      launch<__half>(problem, loss, grad, stream);
      break;
    case Dtype::kBFloat16:
      launch<__nv_bfloat16>(problem, loss, grad, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace r2m
