// ATen front end of the extension: argument checks, output allocation, tiling, launches.
#include "scan_api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "scan.h"

namespace dmscan {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "defmamba_scan_cuda: u/delta/B/C must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return DType::kF32;
}

int padded_states(int64_t n) { return n <= 16 ? 16 : 64; }
int channels_per_warp(int ns) { return 32 * kStatesPerThread / ns; }

int smem_optin_limit(int device) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

// Pick the warps per block: fewest idle channels first, then fewest tiles per group, among the
// block sizes whose shared memory fits the device.
void choose_tiling(ScanGeometry& geo, bool backward, int device) {
  const int dg = geo.dim / geo.groups;
  const int cpw = channels_per_warp(geo.ns);
  const size_t limit = static_cast<size_t>(smem_optin_limit(device));
  int best_w = 0, best_tiles = 0;
  long best_waste = std::numeric_limits<long>::max();
  for (int w = kMaxWarps; w >= 1; --w) {
    const size_t smem = backward ? bwd_smem_bytes(geo.ns, w) : fwd_smem_bytes(geo.ns, w);
    if (smem > limit) continue;
    const int ct = w * cpw;
    const int tiles = (dg + ct - 1) / ct;
    const long waste = static_cast<long>(tiles) * ct - dg;
    if (waste < best_waste || (waste == best_waste && tiles < best_tiles)) {
      best_w = w;
      best_tiles = tiles;
      best_waste = waste;
    }
  }
  TORCH_CHECK(best_w > 0, "defmamba_scan_cuda: not enough shared memory on this device (",
              limit, " bytes per block)");
  geo.warps = best_w;
  geo.tiles_per_group = best_tiles;
}

void check_param(const std::optional<at::Tensor>& t, const char* name, int64_t dim, const at::Tensor& u) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->is_cuda() && t->device() == u.device(), "defmamba_scan_cuda: ", name,
              " must be on the device of u");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == dim, "defmamba_scan_cuda: ", name, " must have shape (", dim, ",)");
}

// fp32 contiguous copy of an optional (dim,) parameter, undefined when absent
at::Tensor float_or_undefined(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(at::kFloat).contiguous();
}

struct Checked {
  at::Tensor u, delta, A, B, C, D, bias;  // D / bias undefined when absent
  ScanGeometry geo;
  DType dtype;
};

// The input pointers shared by FwdParams and BwdParams.
template <typename Params>
void set_inputs(Params& p, const Checked& in) {
  p.geo = in.geo;
  p.u = in.u.data_ptr();
  p.delta = in.delta.data_ptr();
  p.A = in.A.data_ptr<float>();
  p.B = in.B.data_ptr();
  p.C = in.C.data_ptr();
  p.D = in.D.defined() ? in.D.data_ptr<float>() : nullptr;
  p.bias = in.bias.defined() ? in.bias.data_ptr<float>() : nullptr;
}

Checked check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  TORCH_CHECK(u.is_cuda(), "defmamba_scan_cuda: tensors must be on a CUDA device");
  for (const at::Tensor* t : {&delta, &A, &B, &C}) {
    TORCH_CHECK(t->is_cuda() && t->device() == u.device(), "defmamba_scan_cuda: all tensors must be on ",
                u.device());
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "defmamba_scan_cuda: u and delta must be (batch, D, L)");
  TORCH_CHECK(delta.scalar_type() == u.scalar_type() && B.scalar_type() == u.scalar_type() &&
                  C.scalar_type() == u.scalar_type(),
              "defmamba_scan_cuda: u, delta, B and C must have the same dtype");
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "defmamba_scan_cuda: A must be (D, N)");
  const int64_t nstate = A.size(1);
  TORCH_CHECK(nstate >= 1 && nstate <= 64, "defmamba_scan_cuda: N must be in [1, 64], got ", nstate);
  TORCH_CHECK(B.dim() == 4 && B.sizes() == C.sizes() && B.size(0) == batch && B.size(2) == nstate &&
                  B.size(3) == length,
              "defmamba_scan_cuda: B and C must be (batch, G, N, L)");
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "defmamba_scan_cuda: D must be divisible by G");
  TORCH_CHECK(batch <= 65535, "defmamba_scan_cuda: batch must be <= 65535");
  TORCH_CHECK(dim <= std::numeric_limits<int>::max() / 2 && length <= std::numeric_limits<int>::max() / 2,
              "defmamba_scan_cuda: tensor too large");
  check_param(D, "D", dim, u);
  check_param(delta_bias, "delta_bias", dim, u);

  Checked r;
  r.u = u.contiguous();
  r.delta = delta.contiguous();
  r.A = A.to(at::kFloat).contiguous();
  r.B = B.contiguous();
  r.C = C.contiguous();
  r.D = float_or_undefined(D);
  r.bias = float_or_undefined(delta_bias);
  r.dtype = to_dtype(u);
  r.geo.batch = static_cast<int>(batch);
  r.geo.dim = static_cast<int>(dim);
  r.geo.length = static_cast<int>(length);
  r.geo.nstate = static_cast<int>(nstate);
  r.geo.groups = static_cast<int>(groups);
  r.geo.ns = padded_states(nstate);
  r.geo.n_ckpt = length > 0 ? static_cast<int>((length + kTile - 1) / kTile - 1) : 0;
  r.geo.softplus = delta_softplus;
  return r;
}

}  // namespace

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool out_float) {
  Checked in = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
  const c10::cuda::CUDAGuard guard(u.device());
  ScanGeometry& geo = in.geo;

  at::Tensor out = at::empty({geo.batch, geo.dim, geo.length},
                             u.options().dtype(out_float ? at::kFloat : u.scalar_type()));
  at::Tensor states = at::empty({geo.batch, geo.dim, geo.n_ckpt, geo.ns}, u.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, states};

  choose_tiling(geo, /*backward=*/false, u.get_device());
  FwdParams p;
  set_inputs(p, in);
  p.out = out.data_ptr();
  p.states = states.data_ptr<float>();
  p.out_float = out_float;
  C10_CUDA_CHECK(launch_fwd(p, in.dtype, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, states};
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& delta_bias, const at::Tensor& dout,
                                 const at::Tensor& states, bool delta_softplus) {
  Checked in = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
  const c10::cuda::CUDAGuard guard(u.device());
  ScanGeometry& geo = in.geo;
  TORCH_CHECK(dout.is_cuda() && dout.device() == u.device() && dout.sizes() == u.sizes(),
              "defmamba_scan_cuda: dout must be (batch, D, L) on the device of u");
  TORCH_CHECK(dout.scalar_type() == at::kFloat || dout.scalar_type() == u.scalar_type(),
              "defmamba_scan_cuda: dout must be float32 or the input dtype");
  TORCH_CHECK(states.is_cuda() && states.device() == u.device() && states.scalar_type() == at::kFloat &&
                  states.dim() == 4 &&
                  states.size(0) == geo.batch && states.size(1) == geo.dim && states.size(2) == geo.n_ckpt &&
                  states.size(3) == geo.ns,
              "defmamba_scan_cuda: states do not come from fwd() on these shapes");
  const at::Tensor dout_c = dout.contiguous();
  at::Tensor states_c = states.contiguous();
  // the kernel reads states with float4 loads: a view at an odd offset gets a fresh (aligned) copy
  if (reinterpret_cast<std::uintptr_t>(states_c.data_ptr()) % 16 != 0) {
    states_c = states_c.clone(at::MemoryFormat::Contiguous);
  }
  const auto fopt = u.options().dtype(at::kFloat);

  at::Tensor du = at::empty_like(in.u);
  at::Tensor ddelta = at::empty_like(in.delta);
  const bool has_D = D.has_value() && D->defined();
  const bool has_bias = delta_bias.has_value() && delta_bias->defined();
  if (du.numel() == 0) {
    at::Tensor dD = has_D ? at::zeros({geo.dim}, fopt) : at::Tensor();
    at::Tensor dbias = has_bias ? at::zeros({geo.dim}, fopt) : at::Tensor();
    return {du, ddelta, at::zeros({geo.dim, geo.nstate}, fopt), at::zeros_like(in.B), at::zeros_like(in.C), dD, dbias};
  }

  choose_tiling(geo, /*backward=*/true, u.get_device());
  at::Tensor dB, dC, dBC_part;
  if (geo.tiles_per_group == 1) {
    dB = at::empty_like(in.B);
    dC = at::empty_like(in.C);
  } else {
    dBC_part = at::empty({geo.batch, geo.groups, geo.tiles_per_group, 2, geo.nstate, geo.length}, fopt);
  }
  at::Tensor dA_part = at::empty({geo.batch, geo.dim, geo.ns}, fopt);
  at::Tensor dD_part = has_D ? at::empty({geo.batch, geo.dim}, fopt) : at::Tensor();
  at::Tensor dbias_part = has_bias ? at::empty({geo.batch, geo.dim}, fopt) : at::Tensor();

  BwdParams p;
  set_inputs(p, in);
  p.dout = dout_c.data_ptr();
  p.dout_float = dout_c.scalar_type() == at::kFloat;
  p.states = states_c.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dB = dB.defined() ? dB.data_ptr() : nullptr;
  p.dC = dC.defined() ? dC.data_ptr() : nullptr;
  p.dBC_part = dBC_part.defined() ? dBC_part.data_ptr<float>() : nullptr;
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = has_D ? dD_part.data_ptr<float>() : nullptr;
  p.dbias_part = has_bias ? dbias_part.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(launch_bwd(p, in.dtype, c10::cuda::getCurrentCUDAStream().stream()));

  if (dBC_part.defined()) {
    // fixed-order reduction over the channel tiles (deterministic)
    const at::Tensor sums = dBC_part.sum(2);  // (batch, G, 2, N, L)
    dB = sums.select(2, 0).to(in.B.scalar_type()).contiguous();
    dC = sums.select(2, 1).to(in.C.scalar_type()).contiguous();
  }
  at::Tensor dA = dA_part.sum(0).narrow(1, 0, geo.nstate).contiguous();
  at::Tensor dD = has_D ? dD_part.sum(0) : at::Tensor();
  at::Tensor dbias = has_bias ? dbias_part.sum(0) : at::Tensor();
  return {du, ddelta, dA, dB, dC, dD, dbias};
}

}  // namespace dmscan
