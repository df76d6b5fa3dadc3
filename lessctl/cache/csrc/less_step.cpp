// The LESS part of one steady decode step (lessctl/cache/step.py) as one call on CPU, for
// learned kernels: per sequence b and KV head c,
//   psi = | mlp_k(K[b,c,slot]) M_c |                 (0 where the freed key is not folded)
//   H[b,c] += psi^T V[b,c,slot],  z[b,c] += psi      (absorb)
//   vvals[b,c,r] = H[b,c,r] / z[b,c,r]               (the virtual keys' values)
//   logits[b,c,j,r] = log(| mlp_q(q[b, c*g+j]) |_r z[b,c,r])   for the g query heads of c
// with mlp(x) = GELU(GELU(x W1) W2) in fp32 (W1 [d,hid], W2 [hid,R] per head). The torch path
// makes ~14 calls into torch for this; each costs a decode step several microseconds on a CPU
// whatever it computes, and here the arithmetic itself is a few microseconds.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// an AVX2/FMA clone beside the baseline one, chosen when loaded: portable and vectorised
#define LESS_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define LESS_CLONES
#endif

namespace {

// GELU(x) = x/2 (1 + erf(x / sqrt 2)) in place on n floats, erf as a rational function of degree
// 13/12 on [-4, 4] (+-1 beyond, where float's erf is +-1), |error| < 5e-7: branch-free, so the
// loop vectorises (std::erf does not).
inline void gelu(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float t = x[i] * 0.70710678118654752440f;
    t = t < -4.f ? -4.f : (t > 4.f ? 4.f : t);
    const float t2 = t * t;
    float p = -2.72614225801306e-10f;
    p = p * t2 + 2.77068142495902e-08f;
    p = p * t2 - 2.10102402082508e-06f;
    p = p * t2 - 5.69250639462346e-05f;
    p = p * t2 - 7.34990630326855e-04f;
    p = p * t2 - 2.95459980854025e-03f;
    p = p * t2 - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * t2 - 2.13374055278905e-04f;
    q = q * t2 - 1.68282697438203e-03f;
    q = q * t2 - 7.37332916720468e-03f;
    q = q * t2 - 1.42647390514189e-02f;
    x[i] = 0.5f * x[i] * (1.f + t * p / q);
  }
}

// out [r] = GELU(GELU(x w1) w2): x [d] at stride xs, w1 [d,hid], w2 [hid,r] row-major fp32;
// h1 [hid] scratch
template <typename T>
LESS_CLONES void mlp_row(const T* __restrict x, int64_t xs, const float* __restrict w1,
                         const float* __restrict w2, int64_t d, int64_t hid, int64_t r,
                         float* __restrict h1, float* __restrict out) {
  for (int64_t j = 0; j < hid; ++j) h1[j] = 0.f;
  for (int64_t i = 0; i < d; ++i) {
    const float xi = static_cast<float>(x[i * xs]);
    const float* __restrict row = w1 + i * hid;
    for (int64_t j = 0; j < hid; ++j) h1[j] += xi * row[j];
  }
  gelu(h1, hid);
  for (int64_t k = 0; k < r; ++k) out[k] = 0.f;
  for (int64_t j = 0; j < hid; ++j) {
    const float hj = h1[j];
    const float* __restrict row = w2 + j * r;
    for (int64_t k = 0; k < r; ++k) out[k] += hj * row[k];
  }
  gelu(out, r);
}

void check(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "less_step: ", name, " must be on the CPU");
  TORCH_CHECK(x.scalar_type() == dtype, "less_step: ", name, " has dtype ", x.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(x.dim() == dim, "less_step: ", name, " has ", x.dim(), " dims, expected ", dim);
}

}  // namespace

// q [B,H,1,d], keys [B,Hkv,m,d], values [B,Hkv,m,dv] (the model's dtype, any strides);
// slot [B,Hkv,1] int64; folded [B,Hkv,1] bool or None (every freed key is folded);
// w1 [H+Hkv,d,hid], w2 [H+Hkv,hid,R] fp32 contiguous (phi's heads, then psi's);
// m [Hkv,R,R] fp32 contiguous; H [B,Hkv,R,dv], z [B,Hkv,R] fp32 contiguous (updated in place);
// vvals [B,Hkv,R,dv] (the model's dtype, any strides) and logits [B,Hkv,g,R] (fp32 or the
// model's dtype, any strides) written; absorb false: the state is left as it is (no key is folded) and only logits written.
void less_step(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
               const at::Tensor& slot, const std::optional<at::Tensor>& folded,
               const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m, at::Tensor& H,
               at::Tensor& z, at::Tensor& vvals, at::Tensor& logits, bool absorb) {
  const auto dt = keys.scalar_type();
  check(q, "q", dt, 4);
  check(keys, "keys", dt, 4);
  check(values, "values", dt, 4);
  check(vvals, "vvals", dt, 4);
  check(slot, "slot", at::kLong, 3);
  check(w1, "w1", at::kFloat, 3);
  check(w2, "w2", at::kFloat, 3);
  check(m, "m", at::kFloat, 3);
  check(H, "H", at::kFloat, 4);
  check(z, "z", at::kFloat, 3);
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 4 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == dt),
              "less_step: logits must be a 4-dim CPU tensor of float32 or the cache's dtype");
  if (folded) check(*folded, "folded", at::kBool, 3);
  const int64_t B = keys.size(0), hkv = keys.size(1), d = keys.size(3), dv = values.size(3);
  const int64_t h = q.size(1), hid = w1.size(2), r = w2.size(2);
  TORCH_CHECK(q.size(2) == 1 && h % hkv == 0 && q.size(3) == d, "less_step: q shape");
  const int64_t g = h / hkv;
  TORCH_CHECK(w1.is_contiguous() && w2.is_contiguous() && m.is_contiguous() &&
                  H.is_contiguous() && z.is_contiguous(),
              "less_step: w1, w2, m, H and z must be contiguous");
  TORCH_CHECK(w1.size(0) == h + hkv && w1.size(1) == d && w2.size(0) == h + hkv &&
                  w2.size(1) == hid && m.size(0) == hkv && m.size(1) == r && m.size(2) == r,
              "less_step: kernel weight shapes");
  TORCH_CHECK(H.size(0) == B && H.size(1) == hkv && H.size(2) == r && H.size(3) == dv &&
                  z.size(0) == B && z.size(1) == hkv && z.size(2) == r,
              "less_step: state shapes");
  TORCH_CHECK(vvals.size(0) == B && vvals.size(1) == hkv && vvals.size(2) == r &&
                  vvals.size(3) == dv && logits.size(0) == B && logits.size(1) == hkv &&
                  logits.size(2) == g && logits.size(3) == r,
              "less_step: output shapes");
  TORCH_CHECK(slot.size(0) == B && slot.size(1) == hkv, "less_step: slot shape");
  const auto ks = keys.strides(), vs = values.strides(), os = vvals.strides();
  const auto ls = logits.strides(), qs = q.strides(), ss = slot.strides();
  const int64_t fs0 = folded ? folded->stride(0) : 0, fs1 = folded ? folded->stride(1) : 0;
  const int64_t ks0 = ks[0], ks1 = ks[1], ks2 = ks[2], ks3 = ks[3];
  const int64_t vs0 = vs[0], vs1 = vs[1], vs2 = vs[2], vs3 = vs[3];
  const int64_t os0 = os[0], os1 = os[1], os2 = os[2], os3 = os[3];
  const int64_t ls0 = ls[0], ls1 = ls[1], ls2 = ls[2], ls3 = ls[3];
  const int64_t qs0 = qs[0], qs1 = qs[1], qs3 = qs[3], ss0 = ss[0], ss1 = ss[1];
  const int64_t cap = keys.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "less_step", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    scalar_t* op = vvals.data_ptr<scalar_t>();
    const int64_t* sp = slot.data_ptr<int64_t>();
    const bool* fp = folded ? folded->data_ptr<bool>() : nullptr;
    const float* w1p = w1.data_ptr<float>();
    const float* w2p = w2.data_ptr<float>();
    const float* mp = m.data_ptr<float>();
    float* hp = H.data_ptr<float>();
    float* zp = z.data_ptr<float>();
    const bool lf = logits.scalar_type() == at::kFloat;
    float* lpf = lf ? logits.data_ptr<float>() : nullptr;
    scalar_t* lps = lf ? nullptr : logits.data_ptr<scalar_t>();
    at::parallel_for(0, B * hkv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> h1(hid), f(r), v(dv);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / hkv, c = i % hkv;
        float* zb = zp + i * r;
        if (absorb) {
          const int64_t s = sp[b * ss0 + c * ss1];
          TORCH_CHECK(s >= 0 && s < cap, "less_step: slot ", s, " outside 0..", cap - 1);
          const scalar_t* kr = kp + b * ks0 + c * ks1 + s * ks2;
          const scalar_t* vr = vp + b * vs0 + c * vs1 + s * vs2;
          for (int64_t e = 0; e < dv; ++e) v[e] = static_cast<float>(vr[e * vs3]);
          mlp_row(kr, ks3, w1p + (h + c) * d * hid, w2p + (h + c) * hid * r, d, hid, r,
                  h1.data(), f.data());
          const bool in = fp == nullptr || fp[b * fs0 + c * fs1];
          const float* mc = mp + c * r * r;
          float* hb = hp + i * r * dv;
          for (int64_t k = 0; k < r; ++k) {
            float p = 0.f;  // (mlp(k) M)_k
            for (int64_t a = 0; a < r; ++a) p += f[a] * mc[a * r + k];
            const float w = in ? std::fabs(p) : 0.f;
            float* __restrict hr = hb + k * dv;
            for (int64_t e = 0; e < dv; ++e) hr[e] += w * v[e];
            zb[k] += w;
            const float zk = zb[k];
            scalar_t* orow = op + b * os0 + c * os1 + k * os2;
            for (int64_t e = 0; e < dv; ++e) orow[e * os3] = static_cast<scalar_t>(hr[e] / zk);
          }
        }
        for (int64_t j = 0; j < g; ++j) {
          const int64_t head = c * g + j;
          mlp_row(qp + b * qs0 + head * qs1, qs3, w1p + head * d * hid, w2p + head * hid * r, d,
                  hid, r, h1.data(), f.data());
          const int64_t at = b * ls0 + c * ls1 + j * ls2;
          for (int64_t k = 0; k < r; ++k) {
            const float logit = std::log(std::fabs(f[k]) * zb[k]);
            if (lf) {
              lpf[at + k * ls3] = logit;
            } else {
              lps[at + k * ls3] = static_cast<scalar_t>(logit);
            }
          }
        }
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("less_step", &less_step, "The LESS part of one steady decode step (file header)");
}
