// Device helpers shared by the forward and backward kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan.h"

namespace dmscan {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// softplus with the same threshold as torch.nn.functional.softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

template <int X> struct Log2 { static constexpr int value = 1 + Log2<X / 2>::value; };
template <> struct Log2<1> { static constexpr int value = 0; };

// Compile-time layout of one kernel instantiation. A channel is handled by kSplit adjacent lanes,
// each holding kStatesPerThread of the (padded) NS states.
template <int NS> struct Layout {
  static constexpr int kKS = kStatesPerThread;
  static constexpr int kSplit = NS / kKS;          // lanes per channel
  static constexpr int kCPW = 32 / kSplit;         // channels per warp
  static constexpr int kLogSplit = Log2<kSplit>::value;
  static constexpr int kLogCPW = Log2<kCPW>::value;
  static constexpr int kRow = kTile + 1;           // padded row of the per-channel tiles
  static_assert(NS % kKS == 0 && kSplit >= 1 && kSplit <= 32 && 32 % kSplit == 0, "bad NS");
};

// Round a float count up to a multiple of 4 (keeps float4 views 16-byte aligned).
__host__ __device__ constexpr int align4(int n) { return (n + 3) & ~3; }

// Sum over the kSplit lanes of one channel; every lane of the channel gets the total.
template <int SPLIT>
__device__ __forceinline__ float channel_allreduce(float x) {
#pragma unroll
  for (int m = 1; m < SPLIT; m <<= 1) x += __shfl_xor_sync(kFullMask, x, m);
  return x;
}

// Reduce-scatter of the M values of every lane over the channels of a warp (lanes that differ in
// bits [log2(SPLIT), 5) of the lane id). Afterwards v[0 .. M/CPW) of a lane hold complete sums;
// value r of the lane corresponds to original index scatter_index<...>(r, lane).
template <int M, int SPLIT>
__device__ __forceinline__ void warp_channel_reduce(float (&v)[M], int lane) {
  constexpr int kLogSplit = Log2<SPLIT>::value;
  constexpr int kSteps = 5 - kLogSplit;
  static_assert((M >> kSteps) >= 1, "not enough values per lane for the reduce-scatter");
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int mask = SPLIT << step;
    const int half = M >> (step + 1);
    const bool upper = (lane & mask) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float keep = upper ? v[i + half] : v[i];
      const float send = upper ? v[i] : v[i + half];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, mask);
    }
  }
}

template <int M, int SPLIT>
__device__ __forceinline__ int scatter_index(int r, int lane) {
  constexpr int kLogSplit = Log2<SPLIT>::value;
  constexpr int kSteps = 5 - kLogSplit;
  int idx = r;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    if ((lane >> (kLogSplit + step)) & 1) idx += M >> (step + 1);
  }
  return idx;
}

// Launch one of the scan kernels: grid (groups x channel tiles, batch), opting in to more than 48 KB
// of dynamic shared memory when the block needs it.
template <typename Params>
inline cudaError_t launch_scan_kernel(void (*kernel)(Params), const Params& p, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.geo.groups * p.geo.tiles_per_group, p.geo.batch);
  kernel<<<grid, p.geo.warps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmscan
