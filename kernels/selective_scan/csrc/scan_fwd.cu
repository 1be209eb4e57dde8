// Forward selective scan.
//
// Block = (batch b, B/C group g, tile of channels inside g). A channel is owned by kSplit adjacent
// lanes, each with kStatesPerThread states in registers. Time is walked in tiles of kTile steps:
// u, dt (= softplus(delta + bias)) and the group's B, C rows are staged in shared memory with
// coalesced loads, then each thread runs its states over the tile; the per-channel output is the
// sum of the lanes' partial <C, h> (warp shuffles) and is written back through shared memory.
// The state at the end of every tile but the last goes to `states` for the backward.
#include "scan_common.cuh"

namespace dmscan {

template <int NS>
static __host__ __device__ int fwd_smem_floats(int warps) {
  const int ct = warps * Layout<NS>::kCPW;
  return align4(3 * ct * Layout<NS>::kRow) + 2 * kTile * NS;
}

size_t fwd_smem_bytes(int ns, int warps) {
  return sizeof(float) * static_cast<size_t>(ns <= 16 ? fwd_smem_floats<16>(warps) : fwd_smem_floats<64>(warps));
}

template <typename T, int NS>
__global__ void __launch_bounds__(kMaxWarps * 32) scan_fwd_kernel(const FwdParams p) {
  using LY = Layout<NS>;
  constexpr int KS = LY::kKS;
  constexpr int SPLIT = LY::kSplit;
  constexpr int CPW = LY::kCPW;
  constexpr int ROW = LY::kRow;

  const ScanGeometry& geo = p.geo;
  const int nthreads = blockDim.x;
  const int ct = (nthreads / 32) * CPW;  // channels per block

  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* s_dt = smem;
  float* s_u = s_dt + ct * ROW;
  float* s_y = s_u + ct * ROW;
  float* s_B = smem + align4(3 * ct * ROW);
  float* s_C = s_B + kTile * NS;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int s = lane % SPLIT;          // state slice of this lane
  const int c = warp * CPW + lane / SPLIT;  // channel inside the block, < ct

  const int L = geo.length;
  const int N = geo.nstate;
  const int dim = geo.dim;
  const int dg = dim / geo.groups;
  const int g = blockIdx.x / geo.tiles_per_group;
  const int tile = blockIdx.x % geo.tiles_per_group;
  const int b = blockIdx.y;
  const int d0 = g * dg + tile * ct;
  const int nvalid = min(ct, dg - tile * ct);
  const bool active = c < nvalid;
  const int d = d0 + c;

  float A2[KS], h[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = s * KS + k;
    A2[k] = (active && n < N) ? p.A[static_cast<size_t>(d) * N + n] * kLog2e : 0.f;
    h[k] = 0.f;
  }
  const float Dv = (p.D != nullptr && active) ? p.D[d] : 0.f;

  const size_t row0 = (static_cast<size_t>(b) * dim + d0) * L;  // first channel of the block
  const T* __restrict__ u = static_cast<const T*>(p.u) + row0;
  const T* __restrict__ dl = static_cast<const T*>(p.delta) + row0;
  const size_t grp0 = (static_cast<size_t>(b) * geo.groups + g) * N * L;
  const T* __restrict__ Bp = static_cast<const T*>(p.B) + grp0;
  const T* __restrict__ Cp = static_cast<const T*>(p.C) + grp0;

  const int ntiles = (L + kTile - 1) / kTile;
  for (int it = 0; it < ntiles; ++it) {
    const int t0 = it * kTile;
    const int len = min(kTile, L - t0);

    // ---- stage u, dt, B, C of this tile (zeros outside the valid range) ----
    for (int idx = tid; idx < ct * kTile; idx += nthreads) {
      const int cc = idx / kTile;
      const int j = idx % kTile;
      float uv = 0.f, dv = 0.f;
      if (cc < nvalid && j < len) {
        const size_t off = static_cast<size_t>(cc) * L + t0 + j;
        uv = to_float(u[off]);
        float x = to_float(dl[off]);
        if (p.bias != nullptr) x += p.bias[d0 + cc];
        dv = geo.softplus ? softplus_f(x) : x;
      }
      s_u[cc * ROW + j] = uv;
      s_dt[cc * ROW + j] = dv;
    }
    for (int idx = tid; idx < NS * kTile; idx += nthreads) {
      const int n = idx / kTile;
      const int j = idx % kTile;
      float bv = 0.f, cv = 0.f;
      if (n < N && j < len) {
        const size_t off = static_cast<size_t>(n) * L + t0 + j;
        bv = to_float(Bp[off]);
        cv = to_float(Cp[off]);
      }
      s_B[j * NS + n] = bv;
      s_C[j * NS + n] = cv;
    }
    __syncthreads();

    // ---- recurrence over the tile ----
    for (int j = 0; j < len; ++j) {
      const float dt = s_dt[c * ROW + j];
      const float uv = s_u[c * ROW + j];
      const float dtu = dt * uv;
      const float4 bq = *reinterpret_cast<const float4*>(s_B + j * NS + s * KS);
      const float4 cq = *reinterpret_cast<const float4*>(s_C + j * NS + s * KS);
      const float bb[4] = {bq.x, bq.y, bq.z, bq.w};
      const float cc[4] = {cq.x, cq.y, cq.z, cq.w};
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) {
        h[k] = exp2f(dt * A2[k]) * h[k] + dtu * bb[k];
        y += cc[k] * h[k];
      }
      y = channel_allreduce<SPLIT>(y);
      if (s == 0) s_y[c * ROW + j] = y + Dv * uv;
    }

    // ---- checkpoint for the backward ----
    if (it + 1 < ntiles && active) {
      float* dst = p.states + ((static_cast<size_t>(b) * dim + d) * geo.n_ckpt + it) * NS + s * KS;
      *reinterpret_cast<float4*>(dst) = make_float4(h[0], h[1], h[2], h[3]);
    }
    __syncthreads();

    // ---- write the outputs of the tile ----
    for (int idx = tid; idx < ct * kTile; idx += nthreads) {
      const int cc = idx / kTile;
      const int j = idx % kTile;
      if (cc < nvalid && j < len) {
        const size_t off = row0 + static_cast<size_t>(cc) * L + t0 + j;
        const float y = s_y[cc * ROW + j];
        if (p.out_float) {
          static_cast<float*>(p.out)[off] = y;
        } else {
          static_cast<T*>(p.out)[off] = from_float<T>(y);
        }
      }
    }
    // The next tile's staging writes s_u/s_dt/s_B/s_C only, which nobody reads after the barrier
    // above; s_y is rewritten only after the next staging barrier.
  }
}

template <typename T, int NS>
static cudaError_t launch_fwd_t(const FwdParams& p, cudaStream_t stream) {
  return launch_scan_kernel(scan_fwd_kernel<T, NS>, p, fwd_smem_bytes(NS, p.geo.warps), stream);
}

cudaError_t launch_fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  const bool small = p.geo.ns <= 16;
  switch (dtype) {
    case DType::kF32:
      return small ? launch_fwd_t<float, 16>(p, stream) : launch_fwd_t<float, 64>(p, stream);
    case DType::kF16:
      return small ? launch_fwd_t<__half, 16>(p, stream) : launch_fwd_t<__half, 64>(p, stream);
    case DType::kBF16:
      return small ? launch_fwd_t<__nv_bfloat16, 16>(p, stream) : launch_fwd_t<__nv_bfloat16, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmscan
