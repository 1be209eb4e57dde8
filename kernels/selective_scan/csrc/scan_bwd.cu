// Backward selective scan.
//
// Same block / lane layout as the forward. Tiles of kTile steps are visited last to first; the
// adjoint of the carried state (gc = a_{t+1} * g_{t+1}) is kept in registers across tiles.
// Inside a tile:
//   pass 1: starting from the checkpoint the forward stored, run the recurrence once and keep
//           the state at the start of each kSub-step sub-tile in shared memory;
//   then for each sub-tile, last to first:
//   pass 2: recompute the kSub states h_t and decays a_t = exp(dt_t A) into registers;
//   pass 3: walk them in reverse with the adjoint recurrence
//             g_t = dout_t C_t + a_{t+1} g_{t+1}
//           and accumulate
//             du_t    = dt_t sum_n g_t B_t + D dout_t
//             ddt_t   = u_t sum_n g_t B_t + sum_n A g_t a_t h_{t-1}
//             dA      += dt_t g_t a_t h_{t-1}
//             dB_t[n] = sum_channels g_t dt_t u_t,   dC_t[n] = sum_channels dout_t h_t
//           The channel sums of dB/dC are a warp reduce-scatter followed by a sum over the warps
//           of the block in shared memory (fixed order, so results are deterministic).
#include "scan_common.cuh"

namespace dmscan {

template <int NS>
struct BwdSmem {
  // float offsets of the shared-memory regions for a block of `warps` warps
  int dt, u, dout, B, C, bnd, red, total;
  __host__ __device__ explicit BwdSmem(int warps) {
    const int ct = warps * Layout<NS>::kCPW;
    const int row = Layout<NS>::kRow;
    dt = 0;
    u = dt + ct * row;
    dout = u + ct * row;
    B = align4(dout + ct * row);
    C = B + kTile * NS;
    bnd = C + kTile * NS;                                // (kTile / kSub) x threads x float4
    red = bnd + (kTile / kSub) * warps * 32 * 4;         // 2 buffers x warps x 2NS x (kSub + 1)
    total = red + 2 * warps * 2 * NS * (kSub + 1);
  }
};

size_t bwd_smem_bytes(int ns, int warps) {
  const int floats = ns <= 16 ? BwdSmem<16>(warps).total : BwdSmem<64>(warps).total;
  return sizeof(float) * static_cast<size_t>(floats);
}

template <typename T, int NS>
__global__ void __launch_bounds__(kMaxWarps * 32) scan_bwd_kernel(const BwdParams p) {
  using LY = Layout<NS>;
  constexpr int KS = LY::kKS;
  constexpr int SPLIT = LY::kSplit;
  constexpr int CPW = LY::kCPW;
  constexpr int ROW = LY::kRow;
  constexpr int M = 2 * KS;           // dB and dC contributions of one lane per step
  constexpr int RPW = M / CPW;        // complete sums a lane holds after the reduce-scatter
  constexpr int RROW = kSub + 1;      // padded row of the reduction buffer
  static_assert(KS == 4, "the float4 accesses assume 4 states per thread");
  static_assert(kTile % kSub == 0, "kTile must be a multiple of kSub");

  const ScanGeometry& geo = p.geo;
  const int nthreads = blockDim.x;
  const int nwarps = nthreads / 32;
  const int ct = nwarps * CPW;

  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const BwdSmem<NS> lay(nwarps);
  float* s_dt = smem + lay.dt;      // dt, overwritten by ddelta once consumed
  float* s_u = smem + lay.u;        // u, overwritten by du once consumed
  float* s_do = smem + lay.dout;
  const float* s_B = smem + lay.B;
  const float* s_C = smem + lay.C;
  float* s_Bw = smem + lay.B;
  float* s_Cw = smem + lay.C;
  float4* s_bnd = reinterpret_cast<float4*>(smem + lay.bnd);
  float* s_red = smem + lay.red;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int s = lane % SPLIT;
  const int c = warp * CPW + lane / SPLIT;

  const int L = geo.length;
  const int N = geo.nstate;
  const int dim = geo.dim;
  const int G = geo.groups;
  const int dg = dim / G;
  const int tiles = geo.tiles_per_group;
  const int g = blockIdx.x / tiles;
  const int tile = blockIdx.x % tiles;
  const int b = blockIdx.y;
  const int d0 = g * dg + tile * ct;
  const int nvalid = min(ct, dg - tile * ct);
  const bool active = c < nvalid;
  const int d = d0 + c;

  float A2[KS], Ad[KS], dA_acc[KS], gc[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = s * KS + k;
    Ad[k] = (active && n < N) ? p.A[static_cast<size_t>(d) * N + n] : 0.f;
    A2[k] = Ad[k] * kLog2e;
    dA_acc[k] = 0.f;
    gc[k] = 0.f;
  }
  const float Dv = (p.D != nullptr && active) ? p.D[d] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;

  const size_t row0 = (static_cast<size_t>(b) * dim + d0) * L;
  const T* __restrict__ u = static_cast<const T*>(p.u) + row0;
  const T* __restrict__ dl = static_cast<const T*>(p.delta) + row0;
  const size_t grp0 = (static_cast<size_t>(b) * G + g) * N * L;
  const T* __restrict__ Bp = static_cast<const T*>(p.B) + grp0;
  const T* __restrict__ Cp = static_cast<const T*>(p.C) + grp0;

  const int ntiles = (L + kTile - 1) / kTile;
  for (int it = ntiles - 1; it >= 0; --it) {
    const int t0 = it * kTile;
    const int len = min(kTile, L - t0);
    __syncthreads();  // the previous tile's outputs have been read out of s_u / s_dt

    // ---- stage u, dt, dout, B, C (zeros outside the valid range) ----
    for (int idx = tid; idx < ct * kTile; idx += nthreads) {
      const int cc = idx / kTile;
      const int j = idx % kTile;
      float uv = 0.f, dv = 0.f, gv = 0.f;
      if (cc < nvalid && j < len) {
        const size_t off = static_cast<size_t>(cc) * L + t0 + j;
        uv = to_float(u[off]);
        float x = to_float(dl[off]);
        if (p.bias != nullptr) x += p.bias[d0 + cc];
        dv = geo.softplus ? softplus_f(x) : x;
        if (p.dout_float) {
          gv = static_cast<const float*>(p.dout)[row0 + off];
        } else {
          gv = to_float(static_cast<const T*>(p.dout)[row0 + off]);
        }
      }
      s_u[cc * ROW + j] = uv;
      s_dt[cc * ROW + j] = dv;
      s_do[cc * ROW + j] = gv;
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
      s_Bw[j * NS + n] = bv;
      s_Cw[j * NS + n] = cv;
    }
    __syncthreads();

    // ---- pass 1: states at the start of every sub-tile ----
    float h[KS];
    if (it > 0 && active) {
      const float4 hq = *reinterpret_cast<const float4*>(
          p.states + ((static_cast<size_t>(b) * dim + d) * geo.n_ckpt + (it - 1)) * NS + s * KS);
      h[0] = hq.x; h[1] = hq.y; h[2] = hq.z; h[3] = hq.w;
    } else {
#pragma unroll
      for (int k = 0; k < KS; ++k) h[k] = 0.f;
    }
    const int nsub = (len + kSub - 1) / kSub;
    for (int js = 0; js < nsub; ++js) {
      s_bnd[js * nthreads + tid] = make_float4(h[0], h[1], h[2], h[3]);
      if (js + 1 == nsub) break;
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        const int j = js * kSub + i;
        const float dt = s_dt[c * ROW + j];
        const float dtu = dt * s_u[c * ROW + j];
        const float4 bq = *reinterpret_cast<const float4*>(s_B + j * NS + s * KS);
        const float bb[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
        for (int k = 0; k < KS; ++k) h[k] = exp2f(dt * A2[k]) * h[k] + dtu * bb[k];
      }
    }

    // ---- passes 2 and 3, sub-tiles last to first ----
    for (int js = nsub - 1; js >= 0; --js) {
      const float4 hb = s_bnd[js * nthreads + tid];
      const float h0[KS] = {hb.x, hb.y, hb.z, hb.w};  // h_{t-1} of the sub-tile's first step
      float hs[kSub][KS], as[kSub][KS];
      {
        float hc[KS] = {h0[0], h0[1], h0[2], h0[3]};
#pragma unroll
        for (int i = 0; i < kSub; ++i) {
          const int j = js * kSub + i;
          const float dt = s_dt[c * ROW + j];
          const float dtu = dt * s_u[c * ROW + j];
          const float4 bq = *reinterpret_cast<const float4*>(s_B + j * NS + s * KS);
          const float bb[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
          for (int k = 0; k < KS; ++k) {
            const float a = exp2f(dt * A2[k]);
            hc[k] = a * hc[k] + dtu * bb[k];
            as[i][k] = a;
            hs[i][k] = hc[k];
          }
        }
      }

      const int buf = js & 1;
      float* red_w = s_red + (buf * nwarps + warp) * (2 * NS) * RROW;
#pragma unroll
      for (int i = kSub - 1; i >= 0; --i) {
        const int j = js * kSub + i;
        const float dt = s_dt[c * ROW + j];
        const float uv = s_u[c * ROW + j];
        const float dout = s_do[c * ROW + j];
        const float4 bq = *reinterpret_cast<const float4*>(s_B + j * NS + s * KS);
        const float4 cq = *reinterpret_cast<const float4*>(s_C + j * NS + s * KS);
        const float bb[4] = {bq.x, bq.y, bq.z, bq.w};
        const float cc[4] = {cq.x, cq.y, cq.z, cq.w};
        const float dtu = dt * uv;
        float P = 0.f, Q = 0.f;
        float v[M];
#pragma unroll
        for (int k = 0; k < KS; ++k) {
          const float gk = dout * cc[k] + gc[k];              // dL/dh_t
          const float hprev = (i > 0) ? hs[i - 1][k] : h0[k];  // h_{t-1}
          const float da = gk * as[i][k] * hprev;               // dL/d(dt*A) of this step
          gc[k] = as[i][k] * gk;                                // carried to step t-1
          P += gk * bb[k];
          Q += da * Ad[k];
          dA_acc[k] += da * dt;
          v[k] = gk * dtu;              // dB contribution
          v[KS + k] = dout * hs[i][k];  // dC contribution
        }
        P = channel_allreduce<SPLIT>(P);
        Q = channel_allreduce<SPLIT>(Q);
        warp_channel_reduce<M, SPLIT>(v, lane);
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const int orig = scatter_index<M, SPLIT>(r, lane);
          const int which = orig / KS;  // 0: dB, 1: dC
          const int n = s * KS + orig % KS;
          red_w[(which * NS + n) * RROW + i] = v[r];
        }
        const float du = dt * P + Dv * dout;
        const float ddt = uv * P + Q;
        // d softplus(x)/dx = sigmoid(x) = 1 - exp(-softplus(x))
        const float ddl = geo.softplus ? ddt * (-expm1f(-dt)) : ddt;
        dD_acc += dout * uv;
        dbias_acc += ddl;
        __syncwarp();  // every lane of the channel has read s_u / s_dt at step j
        if (s == 0) {
          s_u[c * ROW + j] = du;
          s_dt[c * ROW + j] = ddl;
        }
      }
      __syncthreads();

      // sum the warps' partial dB / dC of this sub-tile (fixed order) and write them out
      for (int idx = tid; idx < 2 * NS * kSub; idx += nthreads) {
        const int i = idx % kSub;
        const int e = idx / kSub;
        const int which = e / NS;
        const int n = e % NS;
        const int t = t0 + js * kSub + i;
        if (n < N && t < L) {
          float acc = 0.f;
          for (int w = 0; w < nwarps; ++w) acc += s_red[((buf * nwarps + w) * (2 * NS) + e) * RROW + i];
          if (tiles == 1) {
            T* dst = static_cast<T*>(which == 0 ? p.dB : p.dC);
            dst[grp0 + static_cast<size_t>(n) * L + t] = from_float<T>(acc);
          } else {
            const size_t off = ((((static_cast<size_t>(b) * G + g) * tiles + tile) * 2 + which) * N + n) * L + t;
            p.dBC_part[off] = acc;
          }
        }
      }
      // no barrier: the next sub-tile writes the other reduction buffer
    }
    __syncthreads();

    // ---- write du and ddelta of the tile ----
    for (int idx = tid; idx < ct * kTile; idx += nthreads) {
      const int cc = idx / kTile;
      const int j = idx % kTile;
      if (cc < nvalid && j < len) {
        const size_t off = row0 + static_cast<size_t>(cc) * L + t0 + j;
        static_cast<T*>(p.du)[off] = from_float<T>(s_u[cc * ROW + j]);
        static_cast<T*>(p.ddelta)[off] = from_float<T>(s_dt[cc * ROW + j]);
      }
    }
  }

  if (active) {
    float* dst = p.dA_part + (static_cast<size_t>(b) * dim + d) * NS + s * KS;
    *reinterpret_cast<float4*>(dst) = make_float4(dA_acc[0], dA_acc[1], dA_acc[2], dA_acc[3]);
    if (s == 0) {
      if (p.dD_part != nullptr) p.dD_part[static_cast<size_t>(b) * dim + d] = dD_acc;
      if (p.dbias_part != nullptr) p.dbias_part[static_cast<size_t>(b) * dim + d] = dbias_acc;
    }
  }
}

template <typename T, int NS>
static cudaError_t launch_bwd_t(const BwdParams& p, cudaStream_t stream) {
  return launch_scan_kernel(scan_bwd_kernel<T, NS>, p, bwd_smem_bytes(NS, p.geo.warps), stream);
}

cudaError_t launch_bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  const bool small = p.geo.ns <= 16;
  switch (dtype) {
    case DType::kF32:
      return small ? launch_bwd_t<float, 16>(p, stream) : launch_bwd_t<float, 64>(p, stream);
    case DType::kF16:
      return small ? launch_bwd_t<__half, 16>(p, stream) : launch_bwd_t<__half, 64>(p, stream);
    case DType::kBF16:
      return small ? launch_bwd_t<__nv_bfloat16, 16>(p, stream) : launch_bwd_t<__nv_bfloat16, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmscan
