// Fused CPU kernels for the training step (built on first use by lm/kernels/__init__.py).
//
// lstm_forward / lstm_backward: one LSTM layer over a BPTT window. Per time step the
// only work left is one [B, H] x [H, 4H] product (at::mm, so oneDNN/MKL) and one pass
// over the gates that does everything element-wise: activations, cell, tanh(c), the
// output, the mask on h_{t-1} and the cast to the product dtype for the next step.
// The forward and backward of PyTorch's own formulation launch about 8 and 15 ops per
// step; here each is one loop in which the data stays in registers.
//
// gru_forward / gru_backward: the same for a GRU layer (gate order r, z, n as nn.GRU): one
// [B, H] x [H, 3H] product and one element-wise pass per step. The mask on h_{t-1} is on the
// product's input only; the interpolation z * h_{t-1} uses the unmasked h_{t-1} (Gal &
// Ghahramani's GRU). b_hn is an input of its own (it sits inside the reset product); the caller
// folds b_hr and b_hz into x_proj.
//
// linear_nll_forward: the decoder product and the summed cross-entropy in one go. The
// logits are written once by the product; one pass per row turns them, in place, into
// d loss / d logits (softmax - one-hot), so the backward is two products.
//
// sgd_bf16_copy: the SGD update of an fp32 weight from the bf16 gradient of its bf16 copy,
// and the copy rewritten from the new weight, in one pass (lm/weight_copies.py says why);
// bf16_sum_squares: that gradient's squared norm for the clip, read once in bf16.
//
// dropout_forward: x * mask / keep with the mask drawn from a counter-based hash of
// (seed, element index), so the backward regenerates it from the seed (nothing stored)
// and any thread count draws the same mask.
//
// Layout: x_proj [B, T, 4H] (3H for the GRU) and the outputs [B, T, H] are batch-first as the model
// holds them; h_in (the product inputs) [B, T, H] and the gate gradients [B, T, 4H]
// are batch-first too so that the weight gradient is one product over all steps.
// Gate order i, f, g, o as nn.LSTM. Element-wise math is fp32; "compute" is the
// dtype of the products (fp32 or bf16).

#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// exp, sigmoid and tanh written branch-free so the compiler vectorises the loops
// (libm's are scalar calls). exp: Cody-Waite range reduction and a degree-6
// polynomial (Cephes expf), within 2 ulp over the clamped range.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : x;  // comparisons, not fmin/fmax (library calls that block vectorisation);
  x = x > 88.3f ? 88.3f : x;    // a NaN passes through both and stays NaN
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no floorf call, which blocks vectorisation)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float fast_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// tanh: an odd polynomial near 0 (Cephes tanhf, |x| < 0.625), 1 - 2 / (e^{2|x|} + 1) beyond.
inline float fast_tanh(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float small = -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * x + x;
  const float large = std::copysign(1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f), x);
  return a < 0.625f ? small : large;
}

// bf16 is handled as its raw bits (uint16_t), which the compiler vectorises (c10::BFloat16,
// a struct with a NaN branch, it does not): widening is a shift, narrowing rounds to
// nearest even as c10 does (a NaN stays a NaN or becomes inf: either is non-finite).
using bf16_bits = uint16_t;

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline bf16_bits from_float<bf16_bits>(float v) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  return static_cast<bf16_bits>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The tensor's data as the element type the kernels compute on (bf16 as raw bits).
template <typename T>
T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, bf16_bits>) return reinterpret_cast<T*>(t.data_ptr<c10::BFloat16>());
  else return t.data_ptr<T>();
}

// rows per task so that one task has at least ~16K elements (smaller work stays on one thread)
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

void check(bool ok, const char* what) { TORCH_CHECK(ok, "lm fused kernel: ", what); }

// One batch row of one forward step: gates -> activations, cell, tanh(c), output h_t.
template <typename scalar_t>
void forward_row(int64_t H, const scalar_t* __restrict x_row, const scalar_t* __restrict r_row, float* __restrict a,
                 const float* __restrict c_prev, float* __restrict c_new, float* __restrict tc, float* __restrict h_row) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float i = fast_sigmoid(to_float(x_row[j]) + to_float(r_row[j]));
    const float f = fast_sigmoid(to_float(x_row[H + j]) + to_float(r_row[H + j]));
    const float g = fast_tanh(to_float(x_row[2 * H + j]) + to_float(r_row[2 * H + j]));
    const float o = fast_sigmoid(to_float(x_row[3 * H + j]) + to_float(r_row[3 * H + j]));
    const float c = f * c_prev[j] + i * g;
    const float th = fast_tanh(c);
    a[j] = i;
    a[H + j] = f;
    a[2 * H + j] = g;
    a[3 * H + j] = o;
    c_new[j] = c;
    tc[j] = th;
    h_row[j] = o * th;
  }
}

// dst = src (* mask), narrowed to the product dtype: the next step's product input.
template <typename scalar_t>
void masked_copy(int64_t H, const float* __restrict src, const float* __restrict mask, scalar_t* __restrict dst) {
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dst[j] = from_float<scalar_t>(src[j] * mask[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dst[j] = from_float<scalar_t>(src[j]);
  }
}

// One batch row of one backward step, given d h_t (all paths summed) and d c_t from above:
// writes d gates (pre-activation) and turns dc into d c_{t-1}.
template <typename scalar_t>
void backward_row(int64_t H, const float* __restrict dh, float* __restrict dc, const float* __restrict a,
                  const float* __restrict c_prev, const float* __restrict tc, scalar_t* __restrict dg) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
    const float th = tc[j];
    const float dcell = dc[j] + dh[j] * o * (1.0f - th * th);
    dg[j] = from_float<scalar_t>(dcell * g * i * (1.0f - i));
    dg[H + j] = from_float<scalar_t>(dcell * c_prev[j] * f * (1.0f - f));
    dg[2 * H + j] = from_float<scalar_t>(dcell * i * (1.0f - g * g));
    dg[3 * H + j] = from_float<scalar_t>(dh[j] * th * o * (1.0f - o));
    dc[j] = dcell * f;
  }
}

// dh = (rec * mask if rec else dh) + d_out: d h_t from the step above (through the mask that
// h_t met on its way into it) and from the layer's output.
template <typename scalar_t>
void gather_dh(int64_t H, const scalar_t* __restrict rec, const float* __restrict mask, const float* __restrict d_out,
               float* __restrict dh) {
  if (rec != nullptr && mask != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] = to_float(rec[j]) * mask[j];
  } else if (rec != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] = to_float(rec[j]);
  }
  if (d_out != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] += d_out[j];
  }
}

// The time loop's per-step product a @ weight^T, weight [n, k] as a linear layer holds it. In bf16
// the weight is laid out for oneDNN once per window (mkldnn::_reorder_linear_weight) and every
// step runs the packed product: otherwise each step re-packs the whole weight, which costs about a
// quarter of the product's time at these shapes ([20, 650] x [650, 2600]). Elsewhere, or where
// the packed ops are missing, at::mm.
class StepProduct {
 public:
  StepProduct(const at::Tensor& weight, int64_t batch) : w_t_(weight.t()) {
    if (weight.scalar_type() != at::kBFloat16) return;
    try {
      static const auto reorder = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_linear_weight", "");
      torch::jit::Stack stack{weight.contiguous(), c10::IValue(batch)};
      reorder.callBoxed(&stack);
      packed_ = stack[0].toTensor();
    } catch (const c10::Error&) {
      packed_ = at::Tensor();  // no oneDNN bf16 here: plain products
    }
  }

  at::Tensor operator()(const at::Tensor& a) const {
    if (!packed_.defined()) return at::mm(a, w_t_);
    static const auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{a.contiguous(), packed_, c10::IValue(), c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
    linear.callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  at::Tensor w_t_, packed_;
};

// The mask on h_{t-1} of the variational and recurrent dropout variants: none, one [B, H] shared by
// every step, or one per step ([T, B, H]); fp32, already scaled.
class StepMask {
 public:
  StepMask(const c10::optional<at::Tensor>& mask, int64_t B, int64_t H)
      : mask_(mask.has_value() && mask->defined() ? *mask : at::Tensor()),
        data_(mask_.defined() ? mask_.data_ptr<float>() : nullptr),
        stride_(mask_.defined() && mask_.dim() == 3 ? B * H : 0) {}

  bool defined() const { return data_ != nullptr; }
  // step t's mask (nullptr without one), rows of H
  const float* at(int64_t t) const { return data_ == nullptr ? nullptr : data_ + t * stride_; }
  // step 0's mask as a [B, H] tensor (defined() only)
  at::Tensor first() const { return stride_ != 0 ? mask_[0] : mask_; }

 private:
  at::Tensor mask_;
  const float* data_;
  int64_t stride_;
};

// h_in[:, 0] = h0 * mask_0 in the product dtype, also written to step_in (the first product's
// contiguous input).
template <typename scalar_t>
void first_product_input(int64_t B, int64_t T, int64_t H, const float* h0p, const float* m, scalar_t* h_in_p,
                         scalar_t* step_in_p) {
  for (int64_t b = 0; b < B; ++b) {
    masked_copy<scalar_t>(H, h0p + b * H, m ? m + b * H : nullptr, h_in_p + b * T * H);
    std::memcpy(step_in_p + b * H, h_in_p + b * T * H, H * sizeof(scalar_t));
  }
}

template <typename scalar_t>
std::vector<at::Tensor> lstm_forward_impl(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0,
                                          const at::Tensor& w_hh, const c10::optional<at::Tensor>& h_mask) {
  const int64_t B = x_proj.size(0), T = x_proj.size(1), H4 = x_proj.size(2), H = H4 / 4;
  const auto f32 = x_proj.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, T, H}, f32);
  at::Tensor h_in = at::empty({B, T, H}, x_proj.options());
  at::Tensor acts = at::empty({T, B, H4}, f32);
  at::Tensor cells = at::empty({T + 1, B, H}, f32);
  at::Tensor tanh_c = at::empty({T, B, H}, f32);
  const StepProduct product(w_hh, B);
  cells[0].copy_(c0);

  const StepMask masks(h_mask, B, H);

  scalar_t* h_in_p = data<scalar_t>(h_in);
  // the product's input of the step at hand, also written contiguously (h_in[:, t] is strided,
  // and a product on a strided input would copy it first: 70 small copies a window)
  at::Tensor step_in = at::empty({B, H}, x_proj.options());
  scalar_t* step_in_p = data<scalar_t>(step_in);
  first_product_input<scalar_t>(B, T, H, h0.data_ptr<float>(), masks.at(0), h_in_p, step_in_p);
  const scalar_t* xp = data<scalar_t>(x_proj);
  float* actp = acts.data_ptr<float>();
  float* cellp = cells.data_ptr<float>();
  float* tcp = tanh_c.data_ptr<float>();
  float* outp = out.data_ptr<float>();

  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor rec = product(step_in);  // [B, 4H]
    const scalar_t* recp = data<scalar_t>(rec);
    const float* m_next = t + 1 < T ? masks.at(t + 1) : nullptr;
    at::parallel_for(0, B, grain(H4), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* h_row = outp + (b * T + t) * H;
        forward_row<scalar_t>(H, xp + (b * T + t) * H4, recp + b * H4, actp + (t * B + b) * H4, cellp + (t * B + b) * H,
                              cellp + ((t + 1) * B + b) * H, tcp + (t * B + b) * H, h_row);
        if (t + 1 < T) {
          scalar_t* next = h_in_p + (b * T + t + 1) * H;
          masked_copy<scalar_t>(H, h_row, m_next ? m_next + b * H : nullptr, next);
          std::memcpy(step_in_p + b * H, next, H * sizeof(scalar_t));
        }
      }
    });
  }
  at::Tensor h_last = out.select(1, T - 1).clone();
  at::Tensor c_last = cells[T].clone();
  return {out, h_last, c_last, acts, cells, tanh_c, h_in};
}

template <typename scalar_t>
std::vector<at::Tensor> lstm_backward_impl(const at::Tensor& d_out, const at::Tensor& d_h_last, const at::Tensor& d_c_last,
                                           const at::Tensor& acts, const at::Tensor& cells, const at::Tensor& tanh_c,
                                           const at::Tensor& h_in, const at::Tensor& w_hh, const c10::optional<at::Tensor>& h_mask) {
  const int64_t T = acts.size(0), B = acts.size(1), H4 = acts.size(2), H = H4 / 4;
  at::Tensor d_gates = at::empty({B, T, H4}, h_in.options());  // grad of x_proj, in the product dtype
  at::Tensor dh_rec;                                           // d h_{t-1} from the recurrent product
  const StepProduct product(w_hh.t(), B);                      // dg @ w_hh
  at::Tensor step_dg = at::empty({B, H4}, h_in.options());     // d_gates[:, t], contiguous for the product
  scalar_t* step_dg_p = data<scalar_t>(step_dg);
  at::Tensor dh = d_h_last.to(at::kFloat).contiguous().clone();
  at::Tensor dc = d_c_last.to(at::kFloat).contiguous().clone();
  const StepMask masks(h_mask, B, H);

  const float* d_outp = d_out.defined() ? d_out.data_ptr<float>() : nullptr;
  const float* actp = acts.data_ptr<float>();
  const float* cellp = cells.data_ptr<float>();
  const float* tcp = tanh_c.data_ptr<float>();
  scalar_t* dgp = data<scalar_t>(d_gates);
  const scalar_t* dhrp = nullptr;
  float* dhp = dh.data_ptr<float>();
  float* dcp = dc.data_ptr<float>();

  for (int64_t t = T - 1; t >= 0; --t) {
    const bool have_rec = t < T - 1;
    // the mask that multiplied h_t on its way into step t + 1
    const float* m = have_rec ? masks.at(t + 1) : nullptr;
    at::parallel_for(0, B, grain(H4), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* dh_b = dhp + b * H;  // at the last step it holds d h_T already
        gather_dh<scalar_t>(H, have_rec ? dhrp + b * H : nullptr, m ? m + b * H : nullptr,
                            d_outp ? d_outp + (b * T + t) * H : nullptr, dh_b);
        backward_row<scalar_t>(H, dh_b, dcp + b * H, actp + (t * B + b) * H4, cellp + (t * B + b) * H, tcp + (t * B + b) * H,
                               dgp + (b * T + t) * H4);
        std::memcpy(step_dg_p + b * H4, dgp + (b * T + t) * H4, H4 * sizeof(scalar_t));
      }
    });
    dh_rec = product(step_dg);
    dhrp = data<scalar_t>(dh_rec);
  }
  // d h0 = (d h_0 through the first product) * mask_0
  at::Tensor dh0 = dh_rec.to(at::kFloat);
  if (masks.defined()) dh0.mul_(masks.first());
  at::Tensor d_w = at::mm(d_gates.view({B * T, H4}).t(), h_in.view({B * T, H}));
  return {d_gates, dh0, dc, d_w};
}

void check_lstm(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                const c10::optional<at::Tensor>& h_mask) {
  check(x_proj.device().is_cpu(), "CPU tensors only");
  check(x_proj.dim() == 3 && x_proj.size(2) % 4 == 0 && x_proj.size(1) > 0, "x_proj must be [B, T, 4H] with T > 0");
  check(x_proj.is_contiguous() && h0.is_contiguous() && c0.is_contiguous(), "contiguous x_proj, h0, c0");
  check(x_proj.scalar_type() == w_hh.scalar_type(), "x_proj and w_hh in the same dtype");
  check(x_proj.scalar_type() == at::kFloat || x_proj.scalar_type() == at::kBFloat16, "fp32 or bf16 products");
  check(h0.scalar_type() == at::kFloat && c0.scalar_type() == at::kFloat, "fp32 state");
  const int64_t H = x_proj.size(2) / 4;
  check(h0.dim() == 2 && h0.size(0) == x_proj.size(0) && h0.size(1) == H, "h0 must be [B, H]");
  check(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, "w_hh must be [4H, H]");
  if (h_mask.has_value() && h_mask->defined()) {
    check(h_mask->scalar_type() == at::kFloat && h_mask->is_contiguous(), "contiguous fp32 mask");
    check(h_mask->size(-1) == H && h_mask->size(-2) == x_proj.size(0), "mask must be [B, H] or [T, B, H]");
    check(h_mask->dim() == 2 || (h_mask->dim() == 3 && h_mask->size(0) == x_proj.size(1)), "mask must be [B, H] or [T, B, H]");
  }
}

std::vector<at::Tensor> lstm_forward(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& h_mask) {
  check_lstm(x_proj, h0, c0, w_hh, h_mask);
  const at::Tensor w = w_hh.contiguous();
  if (x_proj.scalar_type() == at::kBFloat16) return lstm_forward_impl<bf16_bits>(x_proj, h0, c0, w, h_mask);
  return lstm_forward_impl<float>(x_proj, h0, c0, w, h_mask);
}

std::vector<at::Tensor> lstm_backward(const at::Tensor& d_out, const at::Tensor& d_h_last, const at::Tensor& d_c_last,
                                      const at::Tensor& acts, const at::Tensor& cells, const at::Tensor& tanh_c,
                                      const at::Tensor& h_in, const at::Tensor& w_hh, const c10::optional<at::Tensor>& h_mask) {
  const at::Tensor d_o = d_out.defined() ? d_out.to(at::kFloat).contiguous() : d_out;
  const at::Tensor w = w_hh.contiguous();
  if (h_in.scalar_type() == at::kBFloat16)
    return lstm_backward_impl<bf16_bits>(d_o, d_h_last, d_c_last, acts, cells, tanh_c, h_in, w, h_mask);
  return lstm_backward_impl<float>(d_o, d_h_last, d_c_last, acts, cells, tanh_c, h_in, w, h_mask);
}

// ---------------------------------------------------------------- GRU

// One batch row of one GRU forward step: gh = W_hh h_in (the step's product, no bias), x the input
// projection with b_hr, b_hz folded in; b_hn stays inside the reset product. h_prev is h_{t-1}
// unmasked (the mask is only on the product's input). Writes r, z, n, gh_n = W_hn h_in + b_hn and h_t.
template <typename scalar_t>
void gru_forward_row(int64_t H, const scalar_t* __restrict x_row, const scalar_t* __restrict gh_row,
                     const float* __restrict b_hn, const float* __restrict h_prev, float* __restrict a,
                     float* __restrict ghn_row, float* __restrict h_row) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float r = fast_sigmoid(to_float(x_row[j]) + to_float(gh_row[j]));
    const float z = fast_sigmoid(to_float(x_row[H + j]) + to_float(gh_row[H + j]));
    const float ghn = to_float(gh_row[2 * H + j]) + b_hn[j];
    const float n = fast_tanh(to_float(x_row[2 * H + j]) + r * ghn);
    a[j] = r;
    a[H + j] = z;
    a[2 * H + j] = n;
    ghn_row[j] = ghn;
    h_row[j] = (1.0f - z) * n + z * h_prev[j];
  }
}

// dh += rec * mask (rec, mask optional) + d_out (optional): d h_t gathered from the product of the
// step above (through the mask h_t met on its way into it) and the layer's output, on top of what
// dh holds already (the path through the step above's interpolation, z * dh).
template <typename scalar_t>
void accumulate_dh(int64_t H, const scalar_t* __restrict rec, const float* __restrict mask, const float* __restrict d_out,
                   float* __restrict dh) {
  if (rec != nullptr && mask != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] += to_float(rec[j]) * mask[j];
  } else if (rec != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] += to_float(rec[j]);
  }
  if (d_out != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] += d_out[j];
  }
}

// One batch row of one GRU backward step, given d h_t (all paths summed) in dh: writes d x_proj
// [dr, dz, dn] and d gh [dr, dz, dn * r] (pre-activations), adds d gh_n to the row's d b_hn, and
// leaves in dh the part of d h_{t-1} that skips the product (dh * z).
template <typename scalar_t>
void gru_backward_row(int64_t H, float* __restrict dh, const float* __restrict a, const float* __restrict ghn,
                      const float* __restrict h_prev, scalar_t* __restrict dx, scalar_t* __restrict dgh,
                      float* __restrict d_bhn) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float r = a[j], z = a[H + j], n = a[2 * H + j];
    const float d = dh[j];
    const float dz = d * (h_prev[j] - n) * z * (1.0f - z);
    const float dn = d * (1.0f - z) * (1.0f - n * n);
    const float d_ghn = dn * r;
    const float dr = dn * ghn[j] * r * (1.0f - r);
    const scalar_t dr_c = from_float<scalar_t>(dr), dz_c = from_float<scalar_t>(dz);
    dx[j] = dr_c;
    dx[H + j] = dz_c;
    dx[2 * H + j] = from_float<scalar_t>(dn);
    dgh[j] = dr_c;
    dgh[H + j] = dz_c;
    dgh[2 * H + j] = from_float<scalar_t>(d_ghn);
    d_bhn[j] += d_ghn;
    dh[j] = d * z;
  }
}

template <typename scalar_t>
std::vector<at::Tensor> gru_forward_impl(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
                                         const at::Tensor& b_hn, const c10::optional<at::Tensor>& h_mask) {
  const int64_t B = x_proj.size(0), T = x_proj.size(1), H3 = x_proj.size(2), H = H3 / 3;
  const auto f32 = x_proj.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, T, H}, f32);
  at::Tensor h_in = at::empty({B, T, H}, x_proj.options());
  at::Tensor acts = at::empty({T, B, H3}, f32);  // r, z, n
  at::Tensor gh_n = at::empty({T, B, H}, f32);   // W_hn h_in + b_hn
  const StepProduct product(w_hh, B);

  const StepMask masks(h_mask, B, H);

  scalar_t* h_in_p = data<scalar_t>(h_in);
  at::Tensor step_in = at::empty({B, H}, x_proj.options());  // h_in[:, t], contiguous for the product
  scalar_t* step_in_p = data<scalar_t>(step_in);
  const float* h0p = h0.data_ptr<float>();
  first_product_input<scalar_t>(B, T, H, h0p, masks.at(0), h_in_p, step_in_p);
  const scalar_t* xp = data<scalar_t>(x_proj);
  const float* bp = b_hn.data_ptr<float>();
  float* actp = acts.data_ptr<float>();
  float* ghnp = gh_n.data_ptr<float>();
  float* outp = out.data_ptr<float>();

  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor gh = product(step_in);  // [B, 3H]
    const scalar_t* ghp = data<scalar_t>(gh);
    const float* m_next = t + 1 < T ? masks.at(t + 1) : nullptr;
    at::parallel_for(0, B, grain(H3), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* h_row = outp + (b * T + t) * H;
        const float* h_prev = t == 0 ? h0p + b * H : h_row - H;
        gru_forward_row<scalar_t>(H, xp + (b * T + t) * H3, ghp + b * H3, bp, h_prev, actp + (t * B + b) * H3,
                                  ghnp + (t * B + b) * H, h_row);
        if (t + 1 < T) {
          scalar_t* next = h_in_p + (b * T + t + 1) * H;
          masked_copy<scalar_t>(H, h_row, m_next ? m_next + b * H : nullptr, next);
          std::memcpy(step_in_p + b * H, next, H * sizeof(scalar_t));
        }
      }
    });
  }
  at::Tensor h_last = out.select(1, T - 1).clone();
  return {out, h_last, acts, gh_n, h_in};
}

template <typename scalar_t>
std::vector<at::Tensor> gru_backward_impl(const at::Tensor& d_out, const at::Tensor& d_h_last, const at::Tensor& acts,
                                          const at::Tensor& gh_n, const at::Tensor& h_in, const at::Tensor& out,
                                          const at::Tensor& h0, const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& h_mask) {
  const int64_t T = acts.size(0), B = acts.size(1), H3 = acts.size(2), H = H3 / 3;
  at::Tensor d_x = at::empty({B, T, H3}, h_in.options());   // grad of x_proj, in the product dtype
  at::Tensor d_gh = at::empty({B, T, H3}, h_in.options());  // grad of W_hh h_in (+ b_hn), for the weight's product
  at::Tensor d_bhn_rows = at::zeros({B, H}, acts.options());  // d b_hn per batch row (one thread each), summed after
  at::Tensor dh_rec;                                          // d h_in from the recurrent product
  const StepProduct product(w_hh.t(), B);                     // dgh @ w_hh
  at::Tensor step_dg = at::empty({B, H3}, h_in.options());    // d_gh[:, t], contiguous for the product
  scalar_t* step_dg_p = data<scalar_t>(step_dg);
  at::Tensor dh = d_h_last.clone();  // d h_t, built up across the paths; after a step, the part of d h_{t-1} via z
  const StepMask masks(h_mask, B, H);

  const float* d_outp = d_out.defined() ? d_out.data_ptr<float>() : nullptr;
  const float* actp = acts.data_ptr<float>();
  const float* ghnp = gh_n.data_ptr<float>();
  const float* outp = out.data_ptr<float>();
  const float* h0p = h0.data_ptr<float>();
  scalar_t* dxp = data<scalar_t>(d_x);
  scalar_t* dghp = data<scalar_t>(d_gh);
  float* dbp = d_bhn_rows.data_ptr<float>();
  const scalar_t* dhrp = nullptr;
  float* dhp = dh.data_ptr<float>();

  for (int64_t t = T - 1; t >= 0; --t) {
    const bool have_rec = t < T - 1;
    // the mask that multiplied h_t on its way into step t + 1's product
    const float* m = have_rec ? masks.at(t + 1) : nullptr;
    at::parallel_for(0, B, grain(H3), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* dh_b = dhp + b * H;
        accumulate_dh<scalar_t>(H, have_rec ? dhrp + b * H : nullptr, m ? m + b * H : nullptr,
                                d_outp ? d_outp + (b * T + t) * H : nullptr, dh_b);
        const float* h_prev = t == 0 ? h0p + b * H : outp + (b * T + t - 1) * H;
        gru_backward_row<scalar_t>(H, dh_b, actp + (t * B + b) * H3, ghnp + (t * B + b) * H, h_prev,
                                   dxp + (b * T + t) * H3, dghp + (b * T + t) * H3, dbp + b * H);
        std::memcpy(step_dg_p + b * H3, dghp + (b * T + t) * H3, H3 * sizeof(scalar_t));
      }
    });
    dh_rec = product(step_dg);
    dhrp = data<scalar_t>(dh_rec);
  }
  // d h0 = d h0 via z + (d h_in[:, 0] through the first product) * mask_0
  at::Tensor d_h_in0 = dh_rec.to(at::kFloat);
  if (masks.defined()) d_h_in0.mul_(masks.first());
  at::Tensor dh0 = dh.add_(d_h_in0);
  at::Tensor d_w = at::mm(d_gh.view({B * T, H3}).t(), h_in.view({B * T, H}));
  return {d_x, dh0, d_w, d_bhn_rows.sum(0)};
}

// What the forward and the backward both take: h0 [B, H] fp32, w_hh [3H, H] in the product dtype, the mask.
void check_gru_state(int64_t B, int64_t T, int64_t H, at::ScalarType compute, const at::Tensor& h0, const at::Tensor& w_hh,
                     const c10::optional<at::Tensor>& h_mask) {
  check(h0.device().is_cpu() && w_hh.device().is_cpu(), "CPU tensors only");
  check(compute == at::kFloat || compute == at::kBFloat16, "fp32 or bf16 products");
  check(h0.scalar_type() == at::kFloat && h0.is_contiguous(), "contiguous fp32 h0");
  check(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H, "h0 must be [B, H]");
  check(w_hh.scalar_type() == compute, "x_proj and w_hh in the same dtype");
  check(w_hh.dim() == 2 && w_hh.size(0) == 3 * H && w_hh.size(1) == H, "w_hh must be [3H, H]");
  if (h_mask.has_value() && h_mask->defined()) {
    check(h_mask->device().is_cpu() && h_mask->scalar_type() == at::kFloat && h_mask->is_contiguous(),
          "contiguous fp32 CPU mask");
    const bool shared = h_mask->dim() == 2 && h_mask->size(0) == B && h_mask->size(1) == H;
    const bool per_step = h_mask->dim() == 3 && h_mask->size(0) == T && h_mask->size(1) == B && h_mask->size(2) == H;
    check(shared || per_step, "mask must be [B, H] or [T, B, H]");
  }
}

void check_gru(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& b_hn,
               const c10::optional<at::Tensor>& h_mask) {
  check(x_proj.device().is_cpu() && b_hn.device().is_cpu(), "CPU tensors only");
  check(x_proj.dim() == 3 && x_proj.size(2) % 3 == 0 && x_proj.size(2) > 0 && x_proj.size(1) > 0,
        "x_proj must be [B, T, 3H] with T > 0 and H > 0");
  check(x_proj.is_contiguous(), "contiguous x_proj");
  const int64_t B = x_proj.size(0), T = x_proj.size(1), H = x_proj.size(2) / 3;
  check(b_hn.scalar_type() == at::kFloat && b_hn.is_contiguous() && b_hn.dim() == 1 && b_hn.size(0) == H,
        "b_hn must be [H], contiguous fp32");
  check_gru_state(B, T, H, x_proj.scalar_type(), h0, w_hh, h_mask);
}

// x_proj [B, T, 3H] (compute dtype; W_ih x + b_ih + [b_hr, b_hz, 0]), h0 [B, H] fp32, w_hh [3H, H]
// (compute dtype), b_hn [H] fp32, h_mask None, [B, H] or [T, B, H] fp32 (already scaled). Returns
// out [B, T, H], h_last [B, H] (fp32) and what the backward needs: r, z, n [T, B, 3H] and gh_n [T, B, H]
// (fp32), h_in [B, T, H] (compute dtype).
std::vector<at::Tensor> gru_forward(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
                                    const at::Tensor& b_hn, const c10::optional<at::Tensor>& h_mask) {
  check_gru(x_proj, h0, w_hh, b_hn, h_mask);
  const at::Tensor w = w_hh.contiguous();
  if (x_proj.scalar_type() == at::kBFloat16) return gru_forward_impl<bf16_bits>(x_proj, h0, w, b_hn, h_mask);
  return gru_forward_impl<float>(x_proj, h0, w, b_hn, h_mask);
}

// d_out [B, T, H] (None: the outputs reached no loss) and d_h_last [B, H]; then the forward's saved
// tensors (acts, gh_n, h_in), its out (h_{t-1} of each step but the first) and its inputs h0, w_hh, h_mask.
// Returns d x_proj [B, T, 3H] and d w_hh [3H, H] in the compute dtype, d h0 [B, H] and d b_hn [H] in fp32.
std::vector<at::Tensor> gru_backward(const c10::optional<at::Tensor>& d_out, const at::Tensor& d_h_last, const at::Tensor& acts,
                                     const at::Tensor& gh_n, const at::Tensor& h_in, const at::Tensor& out, const at::Tensor& h0,
                                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& h_mask) {
  check(acts.dim() == 3 && acts.size(2) % 3 == 0 && acts.scalar_type() == at::kFloat && acts.is_contiguous(),
        "acts must be the forward's [T, B, 3H] fp32");
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 3;
  check(gh_n.sizes() == at::IntArrayRef({T, B, H}) && gh_n.scalar_type() == at::kFloat && gh_n.is_contiguous(),
        "gh_n must be the forward's [T, B, H] fp32");
  check(h_in.sizes() == at::IntArrayRef({B, T, H}) && h_in.is_contiguous() && h_in.scalar_type() == w_hh.scalar_type(),
        "h_in must be the forward's [B, T, H], in w_hh's dtype");
  check(out.sizes() == at::IntArrayRef({B, T, H}) && out.scalar_type() == at::kFloat && out.is_contiguous(),
        "out must be the forward's [B, T, H] fp32");
  check(d_h_last.sizes() == at::IntArrayRef({B, H}), "d_h_last must be [B, H]");
  const bool has_d_out = d_out.has_value() && d_out->defined();
  check(!has_d_out || d_out->sizes() == at::IntArrayRef({B, T, H}), "d_out must be [B, T, H]");
  check_gru_state(B, T, H, h_in.scalar_type(), h0, w_hh, h_mask);
  const at::Tensor d_o = has_d_out ? d_out->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor d_h = d_h_last.to(at::kFloat).contiguous();
  const at::Tensor w = w_hh.contiguous();
  if (h_in.scalar_type() == at::kBFloat16)
    return gru_backward_impl<bf16_bits>(d_o, d_h, acts, gh_n, h_in, out, h0, w, h_mask);
  return gru_backward_impl<float>(d_o, d_h, acts, gh_n, h_in, out, h0, w, h_mask);
}

// ---------------------------------------------------------------- decoder + cross-entropy

// One row of logits z: returns logsumexp(z) - z[y] and overwrites z with softmax(z) - onehot(y).
template <typename scalar_t>
double nll_row(int64_t V, scalar_t* __restrict z, int64_t y) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = to_float(z[v]) > mx ? to_float(z[v]) : mx;
  float se = 0.0f;
#pragma omp simd reduction(+ : se)
  for (int64_t v = 0; v < V; ++v) se += fast_exp(to_float(z[v]) - mx);
  const float zy = to_float(z[y]);
  const float inv = 1.0f / se;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) z[v] = from_float<scalar_t>(fast_exp(to_float(z[v]) - mx) * inv);
  z[y] = from_float<scalar_t>(fast_exp(zy - mx) * inv - 1.0f);  // rounded once, as p - 1 in fp32
  return static_cast<double>(std::log(se) + mx - zy);
}

template <typename scalar_t>
double nll_rows(scalar_t* logits, const int64_t* targets, int64_t N, int64_t V) {
  std::vector<double> row_loss(N, 0.0);  // summed in row order below: the same total for any thread count
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_loss[r] = nll_row<scalar_t>(V, logits + r * V, targets[r]);
  });
  double total = 0.0;
  for (double l : row_loss) total += l;
  return total;
}

// h [N, K] and weight [V, K] in the product dtype, bias [V] fp32, targets [N] int64.
// Returns the summed NLL (fp32 scalar, accumulated in fp64; inf beyond fp32's range) and d NLL / d logits [N, V].
std::vector<at::Tensor> linear_nll_forward(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& targets) {
  check(h.device().is_cpu(), "CPU tensors only");
  check(h.dim() == 2 && weight.dim() == 2 && h.size(1) == weight.size(1), "h [N, K] and weight [V, K]");
  check(h.scalar_type() == weight.scalar_type(), "h and weight in the same dtype");
  check(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16, "fp32 or bf16 products");
  check(targets.scalar_type() == at::kLong && targets.numel() == h.size(0), "int64 targets, one per row");
  const int64_t N = h.size(0), V = weight.size(0);
  const at::Tensor y = targets.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) check(yp[r] >= 0 && yp[r] < V, "target out of range");
  at::Tensor logits = at::addmm(bias.to(h.scalar_type()), h, weight.t());
  double total;
  if (h.scalar_type() == at::kBFloat16)
    total = nll_rows<bf16_bits>(data<bf16_bits>(logits), yp, N, V);
  else
    total = nll_rows<float>(logits.data_ptr<float>(), yp, N, V);
  // Rounded to fp32 here, where a sum beyond fp32's range becomes inf (a NaN stays NaN): the non-finite
  // loss the trainer checks for, as F.cross_entropy gives it. at::scalar_tensor would refuse the double
  // ("value cannot be converted to type float without overflow") and end the run with a traceback.
  const float loss = static_cast<float>(total);
  return {at::scalar_tensor(loss, h.options().dtype(at::kFloat)), logits};
}

// ---------------------------------------------------------------- dropout

// A 32-bit integer hash with good avalanche (the "lowbias32" constants); vectorises.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

void dropout_range(const float* __restrict x, float* __restrict out, int64_t begin, int64_t end, uint32_t threshold,
                   float scale, uint32_t seed_lo, uint32_t seed_hi, uint32_t offset) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t h = mix32(mix32((static_cast<uint32_t>(i) + offset) * 0x9E3779B9U ^ seed_lo) + seed_hi);
    out[i] = (h >> 8) < threshold ? x[i] * scale : 0.0f;  // 24 uniform bits against keep * 2^24
  }
}

// x * mask / keep, mask[i] = 1 with probability keep, a function of (seed, offset + i) only: a process
// holding rows of a larger batch passes its first element's global index as offset (data parallelism).
at::Tensor dropout_forward(const at::Tensor& x, double keep, int64_t seed, int64_t offset) {
  check(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "contiguous fp32 CPU input");
  check(keep > 0.0 && keep <= 1.0, "keep probability in (0, 1]");
  check(x.numel() < (int64_t(1) << 32), "at most 2^32 elements");
  at::Tensor out = at::empty_like(x);
  const uint32_t threshold = static_cast<uint32_t>(std::llround(keep * 16777216.0));
  const float scale = static_cast<float>(1.0 / keep);
  const uint64_t s = static_cast<uint64_t>(seed);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    dropout_range(xp, op, b, e, threshold, scale, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                  static_cast<uint32_t>(offset));
  });
  return out;
}

// ---------------------------------------------------------------- SGD with a bf16 weight copy

void sgd_bf16_range(float* __restrict w, const bf16_bits* __restrict g, bf16_bits* __restrict copy, int64_t begin,
                    int64_t end, float alpha) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float v = std::fma(alpha, to_float(g[i]), w[i]);  // torch's add_(g, alpha=alpha): one rounding
    w[i] = v;
    copy[i] = from_float<bf16_bits>(v);
  }
}

// w += alpha * g, then copy = bf16(w); w fp32, g and copy bf16, all contiguous and the same size.
void sgd_bf16_copy(const at::Tensor& w, const at::Tensor& g, const at::Tensor& copy, double alpha) {
  check(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(), "contiguous fp32 CPU weight");
  check(g.scalar_type() == at::kBFloat16 && g.is_contiguous() && g.numel() == w.numel(), "contiguous bf16 gradient of the weight's size");
  check(copy.scalar_type() == at::kBFloat16 && copy.is_contiguous() && copy.numel() == w.numel(), "contiguous bf16 copy of the weight's size");
  float* wp = w.data_ptr<float>();
  const bf16_bits* gp = data<bf16_bits>(g);
  bf16_bits* cp = data<bf16_bits>(copy);
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, w.numel(), 1 << 15, [&](int64_t b, int64_t e) { sgd_bf16_range(wp, gp, cp, b, e, a); });
}

// The sum of squares of a bf16 tensor, accumulated in fp32 within fixed blocks and in double across
// them (the same at any thread count), without an fp32 copy of the tensor: the clip norm of the
// bf16 gradients (torch's norm returns a bf16 tensor's norm rounded to bf16, or copies it to fp32 first).
double bf16_sum_squares(const at::Tensor& g) {
  check(g.device().is_cpu() && g.scalar_type() == at::kBFloat16 && g.is_contiguous(), "contiguous bf16 CPU tensor");
  constexpr int64_t block = 1 << 14;
  const int64_t n = g.numel(), blocks = (n + block - 1) / block;
  const bf16_bits* gp = data<bf16_bits>(g);
  std::vector<float> partial(blocks);
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float s = 0.0f;
      const int64_t end = std::min(n, (b + 1) * block);
#pragma omp simd reduction(+ : s)
      for (int64_t i = b * block; i < end; ++i) {
        const float v = to_float(gp[i]);
        s += v * v;
      }
      partial[b] = s;
    }
  });
  double total = 0.0;
  for (float s : partial) total += s;
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "LSTM layer over a window, forward");
  m.def("lstm_backward", &lstm_backward, "LSTM layer over a window, backward");
  m.def("gru_forward", &gru_forward, "GRU layer over a window, forward");
  m.def("gru_backward", &gru_backward, "GRU layer over a window, backward");
  m.def("dropout_forward", &dropout_forward, "x * mask / keep, the mask a hash of (seed, offset + index)");
  m.def("linear_nll_forward", &linear_nll_forward, "decoder product + summed cross-entropy, forward");
  m.def("sgd_bf16_copy", &sgd_bf16_copy, "w += alpha * g (g bf16), then copy = bf16(w), in one pass");
  m.def("bf16_sum_squares", &bf16_sum_squares, "sum of squares of a bf16 tensor, accumulated in fp32/double");
}
