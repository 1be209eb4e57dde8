// Tensor-level entry points of defmamba_scan_cuda (see README.md for the contract).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace dmscan {

// Returns {out, states}: out (batch, D, L) fp32 if out_float else the input dtype; states holds
// the fp32 recurrent state at every 64-step tile boundary, (batch, D, ceil(L/64) - 1, 16 or 64).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool out_float);

// Returns {du, ddelta, dA, dB, dC, dD, ddelta_bias}; dD / ddelta_bias are undefined (None) when
// D / delta_bias are not given.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& delta_bias, const at::Tensor& dout,
                                 const at::Tensor& states, bool delta_softplus);

}  // namespace dmscan
