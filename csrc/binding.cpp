// torch binding of the `cuda` backend (module r2m_kernels._cuda): checks tensors, allocates
// outputs, calls the launchers of r2m_cuda.h on the current stream, raises on a CUDA error.
// Autograd, the flash-decoding combine and the choice of n_split live in Python
// (r2m_kernels/cuda/), beside the same pieces of the triton backend.
#include <algorithm>
#include <cfloat>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "r2m_cuda.h"

namespace {

r2m::Dtype storage_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return r2m::Dtype::kFloat32;
    case at::kHalf: return r2m::Dtype::kFloat16;
    case at::kBFloat16: return r2m::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "backend='cuda' takes ", name, " in float32, float16 or bfloat16, got ",
                       t.scalar_type(), " (use backend='torch' for other dtypes)");
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "r2m cuda ", what, " failed: ", cudaGetErrorString(err));
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "backend='cuda': ", name,
              " must be on ", like.device(), ", got ", t.device());
}

// The problem description shared by both directions. `hidden` keeps its strides except that
// its last dim must be contiguous (vector loads); `keep` holds tensors made here alive.
r2m::PoolProblem pool_problem(const at::Tensor& hidden, const at::Tensor& q_scaled,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& cu_seqlens, int64_t n_split,
                              std::vector<at::Tensor>& keep) {
  TORCH_CHECK(hidden.stride(-1) == 1, "hidden must have a contiguous last dim");
  TORCH_CHECK(q_scaled.scalar_type() == at::kFloat && q_scaled.is_contiguous(),
              "q_scaled must be contiguous float32");
  TORCH_CHECK(n_split >= 1, "n_split must be >= 1, got ", n_split);
  check_cuda_tensor(q_scaled, hidden, "q");
  r2m::PoolProblem p{};
  p.hidden = hidden.data_ptr();
  p.dtype = storage_dtype(hidden, "hidden");
  p.dim = hidden.size(-1);
  p.heads = q_scaled.size(1);
  p.stride_hs = hidden.stride(-2);
  p.q_scaled = q_scaled.data_ptr<float>();
  p.n_split = static_cast<int>(n_split);
  p.softmax_scale = 1.0f;  // the backward sets its own
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = cu_seqlens.value();
    check_cuda_tensor(cu, hidden, "cu_seqlens");
    TORCH_CHECK(hidden.dim() == 2 && cu.scalar_type() == at::kInt && cu.is_contiguous(),
                "packed hidden (N, D) needs contiguous int32 cu_seqlens");
    p.batch = cu.size(0) - 1;
    p.seq_len = 0;
    p.stride_hb = 0;
    p.cu_seqlens = cu.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(hidden.dim() == 3, "padded hidden must be (B, S, D)");
    p.batch = hidden.size(0);
    p.seq_len = hidden.size(1);
    p.stride_hb = hidden.stride(0);
  }
  TORCH_CHECK(q_scaled.size(0) == p.batch && q_scaled.size(2) == p.dim, "q must be (B, n_h, D)");
  if (mask.has_value()) {
    check_cuda_tensor(mask.value(), hidden, "mask");
    keep.push_back(mask.value().ne(0).to(at::kByte));
    p.mask = keep.back().data_ptr<uint8_t>();
    p.stride_mb = keep.back().stride(0);
    p.stride_ms = keep.back().stride(1);
  }
  return p;
}

// (out (n_split, B, n_h, D) fp32 partial outputs, lse (n_split, B, n_h) fp32).
std::vector<at::Tensor> attention_pool_forward(const at::Tensor& hidden, const at::Tensor& q_scaled,
                                               const c10::optional<at::Tensor>& mask,
                                               const c10::optional<at::Tensor>& cu_seqlens,
                                               int64_t n_split) {
  TORCH_CHECK(hidden.is_cuda(), "backend='cuda' needs CUDA tensors, got hidden on ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  std::vector<at::Tensor> keep;
  const r2m::PoolProblem p = pool_problem(hidden, q_scaled, mask, cu_seqlens, n_split, keep);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor out = at::empty({n_split, p.batch, p.heads, p.dim}, f32);
  at::Tensor lse = at::empty({n_split, p.batch, p.heads}, f32);
  check_launch(r2m::attention_pool_forward(p, out.data_ptr<float>(), lse.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream()),
               "attention_pool_forward");
  return {out, lse};
}

// (dq (n_split, B, n_h, D) fp32 partial sums, times softmax_scale; dhidden (rows, D) in
// hidden's dtype with hidden's shape, or an empty tensor when not needed).
std::vector<at::Tensor> attention_pool_backward(const at::Tensor& hidden, const at::Tensor& q_scaled,
                                                const c10::optional<at::Tensor>& mask,
                                                const c10::optional<at::Tensor>& cu_seqlens,
                                                const at::Tensor& grad, const at::Tensor& lse,
                                                const at::Tensor& delta, double softmax_scale,
                                                int64_t n_split, bool need_dhidden) {
  TORCH_CHECK(hidden.is_cuda(), "backend='cuda' needs CUDA tensors, got hidden on ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  std::vector<at::Tensor> keep;
  r2m::PoolProblem p = pool_problem(hidden, q_scaled, mask, cu_seqlens, n_split, keep);
  p.softmax_scale = static_cast<float>(softmax_scale);
  for (const at::Tensor* t : {&grad, &lse, &delta}) {
    check_cuda_tensor(*t, hidden, "grad/lse/delta");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "grad, lse and delta must be contiguous float32");
  }
  TORCH_CHECK(grad.numel() == p.batch * p.heads * p.dim && lse.numel() == p.batch * p.heads &&
                  delta.numel() == p.batch * p.heads,
              "grad must be (B, n_h, D), lse and delta (B, n_h)");
  at::Tensor dq = at::empty({n_split, p.batch, p.heads, p.dim}, hidden.options().dtype(at::kFloat));
  at::Tensor dhidden = need_dhidden ? at::empty(hidden.sizes(), hidden.options().memory_format(
                                                                    at::MemoryFormat::Contiguous))
                                    : at::empty({0}, hidden.options());
  check_launch(r2m::attention_pool_backward(p, grad.data_ptr<float>(), lse.data_ptr<float>(),
                                            delta.data_ptr<float>(), dq.data_ptr<float>(),
                                            need_dhidden ? dhidden.data_ptr() : nullptr,
                                            c10::cuda::getCurrentCUDAStream()),
               "attention_pool_backward");
  return {dq, dhidden};
}

// (loss (G,) fp32 scaled by loss_scale, grad (n,) fp32 or an empty tensor).
std::vector<at::Tensor> grebt_loss_forward(const at::Tensor& rewards, int64_t group_size,
                                           const c10::optional<at::Tensor>& cu_groups,
                                           int64_t num_groups, int64_t max_group_size, double alpha,
                                           double eps, double loss_scale, bool write_grad) {
  TORCH_CHECK(rewards.is_cuda(), "backend='cuda' needs CUDA tensors, got rewards on ",
              rewards.device());
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "rewards must be contiguous (B,)");
  const c10::cuda::CUDAGuard guard(rewards.device());
  r2m::GrebtProblem p{};
  p.rewards = rewards.data_ptr();
  p.dtype = storage_dtype(rewards, "rewards");
  p.num_groups = num_groups;
  p.group_size = cu_groups.has_value() ? 0 : group_size;
  p.max_group_size = max_group_size;
  if (cu_groups.has_value()) {
    const at::Tensor& cu = cu_groups.value();
    check_cuda_tensor(cu, rewards, "cu_groups");
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.is_contiguous() && cu.numel() == num_groups + 1,
                "cu_groups must be contiguous int32 (G+1,)");
    p.cu_groups = cu.data_ptr<int32_t>();
  }
  // A double beyond float's range cannot be cast (undefined behaviour): clamp first.
  const auto to_float = [](double x) {
    return static_cast<float>(std::clamp(x, -double(FLT_MAX), double(FLT_MAX)));
  };
  p.alpha = to_float(alpha);
  p.eps = to_float(eps);
  p.loss_scale = to_float(loss_scale);
  auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({num_groups}, f32);
  at::Tensor grad = at::empty({write_grad ? rewards.numel() : 0}, f32);
  check_launch(r2m::grebt_loss_forward(p, loss.data_ptr<float>(),
                                       write_grad ? grad.data_ptr<float>() : nullptr,
                                       c10::cuda::getCurrentCUDAStream()),
               "grebt_loss_forward");
  return {loss, grad};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r2m's CUDA kernels (the `cuda` backend); use them through r2m_kernels.";
  m.def("attention_pool_forward", &attention_pool_forward, "attention pool forward partials",
        py::arg("hidden"), py::arg("q_scaled"), py::arg("mask"), py::arg("cu_seqlens"),
        py::arg("n_split"));
  m.def("attention_pool_backward", &attention_pool_backward, "attention pool backward partials",
        py::arg("hidden"), py::arg("q_scaled"), py::arg("mask"), py::arg("cu_seqlens"),
        py::arg("grad"), py::arg("lse"), py::arg("delta"), py::arg("softmax_scale"),
        py::arg("n_split"), py::arg("need_dhidden"));
  m.def("grebt_loss_forward", &grebt_loss_forward, "GREBT loss per group and its gradient",
        py::arg("rewards"), py::arg("group_size"), py::arg("cu_groups"), py::arg("num_groups"),
        py::arg("max_group_size"), py::arg("alpha"), py::arg("eps"), py::arg("loss_scale"),
        py::arg("write_grad"));
}
