// Shared declarations of the defmamba_scan_cuda selective-scan extension.
//
// Host code (scan_api.cpp) fills the parameter structs below and calls the launchers that live in
// the .cu files. The .cu files see only CUDA headers (no ATen), which keeps nvcc fast.
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

namespace dmscan {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Time steps per shared-memory tile. The forward stores the recurrent state at the end of every
// tile (except the last) so that the backward can process the tiles independently, last to first.
constexpr int kTile = 64;
// Time steps per register-resident sub-tile in the backward (states and decays are kept in
// registers for kSub steps while the adjoint recurrence walks them in reverse).
constexpr int kSub = 8;
// SSM states held by one thread; a channel is split over NS / kStatesPerThread adjacent lanes.
constexpr int kStatesPerThread = 4;
// At most this many warps per block.
constexpr int kMaxWarps = 8;

// Geometry shared by both kernels.
struct ScanGeometry {
  int batch = 0, dim = 0, length = 0, nstate = 0, groups = 0;
  int ns = 16;                // padded state count of the kernel instantiation (16 or 64)
  int warps = 1;              // warps per block
  int tiles_per_group = 1;    // channel tiles per B/C group (blockIdx.x = group * tiles + tile)
  int n_ckpt = 0;             // stored states per channel: ceil(length / kTile) - 1
  bool softplus = false;
};

struct FwdParams {
  ScanGeometry geo;
  const void* u = nullptr;      // (batch, dim, L) input dtype, contiguous
  const void* delta = nullptr;  // (batch, dim, L) input dtype, contiguous
  const float* A = nullptr;     // (dim, N)
  const void* B = nullptr;      // (batch, G, N, L) input dtype, contiguous
  const void* C = nullptr;      // (batch, G, N, L) input dtype, contiguous
  const float* D = nullptr;     // (dim,) or null
  const float* bias = nullptr;  // (dim,) or null
  void* out = nullptr;          // (batch, dim, L): fp32 if out_float else input dtype
  float* states = nullptr;      // (batch, dim, n_ckpt, ns)
  bool out_float = true;
};

struct BwdParams {
  ScanGeometry geo;
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const float* bias = nullptr;
  const void* dout = nullptr;    // (batch, dim, L): fp32 if dout_float else input dtype
  const float* states = nullptr; // as written by the forward
  bool dout_float = true;
  void* du = nullptr;            // (batch, dim, L) input dtype
  void* ddelta = nullptr;        // (batch, dim, L) input dtype
  // dB / dC: written directly in the input dtype when tiles_per_group == 1, otherwise every
  // channel tile writes an fp32 partial sum that the host adds up (deterministically).
  void* dB = nullptr;            // (batch, G, N, L) input dtype, used when tiles_per_group == 1
  void* dC = nullptr;            // (batch, G, N, L) input dtype, used when tiles_per_group == 1
  float* dBC_part = nullptr;     // (batch, G, tiles, 2, N, L) fp32, used when tiles_per_group > 1
  float* dA_part = nullptr;      // (batch, dim, ns) per-batch partial sums
  float* dD_part = nullptr;      // (batch, dim) or null
  float* dbias_part = nullptr;   // (batch, dim) or null
};

// Dynamic shared memory (bytes) a block of `warps` warps needs for `ns` padded states.
size_t fwd_smem_bytes(int ns, int warps);
size_t bwd_smem_bytes(int ns, int warps);

// Launch on `stream`; the return value is cudaGetLastError() after the launch.
cudaError_t launch_fwd(const FwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_bwd(const BwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace dmscan
