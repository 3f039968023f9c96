// The optimizer step of bf16 training on a CPU, fused with the two casts around it.
//
// Under autocast every step casts each fp32 weight to bf16 for the forward pass, casts each bf16
// weight gradient back to fp32, and then the optimizer passes over the fp32 weights: three passes
// over memory per parameter. Here the forward pass reads a bf16 copy of each weight kept between
// steps, and one pass per element reads the bf16 gradient, updates the fp32 weight and its
// optimizer state with the formulas of torch.optim's fused CPU kernels, and writes the new bf16
// copy. All parameters share one parallel loop.
//
// Built on first use by torch.utils.cpp_extension (trainable/fused.py); without a C++ compiler
// training falls back to autocast and torch's own fused optimizers.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

namespace {

using at::BFloat16;
using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kGrain = 32768;

struct Segment {
  float* weight;
  BFloat16* copy;
  const BFloat16* grad;
  float* state1;  // momentum buffer (SGD) or exp_avg (Adam)
  float* state2;  // exp_avg_sq (Adam)
  int64_t size;
};

std::vector<Segment> segments(const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& copies,
                              const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& states1,
                              const std::vector<torch::Tensor>& states2) {
  TORCH_CHECK(weights.size() == copies.size() && weights.size() == grads.size(), "one copy and gradient per weight");
  std::vector<Segment> out;
  for (size_t k = 0; k < weights.size(); ++k) {
    const auto& w = weights[k];
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "weights: contiguous fp32");
    TORCH_CHECK(copies[k].scalar_type() == at::kBFloat16 && copies[k].is_contiguous() && copies[k].numel() == w.numel(),
                "copies: contiguous bf16, one per weight");
    TORCH_CHECK(grads[k].scalar_type() == at::kBFloat16 && grads[k].is_contiguous() && grads[k].numel() == w.numel(),
                "gradients: contiguous bf16, one per weight");
    Segment s{w.data_ptr<float>(), copies[k].data_ptr<BFloat16>(), grads[k].data_ptr<BFloat16>(), nullptr, nullptr,
              w.numel()};
    if (!states1.empty()) {
      TORCH_CHECK(states1[k].scalar_type() == at::kFloat && states1[k].is_contiguous() && states1[k].numel() == w.numel(),
                  "optimizer state: contiguous fp32");
      s.state1 = states1[k].data_ptr<float>();
    }
    if (!states2.empty()) {
      TORCH_CHECK(states2[k].scalar_type() == at::kFloat && states2[k].is_contiguous() && states2[k].numel() == w.numel(),
                  "optimizer state: contiguous fp32");
      s.state2 = states2[k].data_ptr<float>();
    }
    out.push_back(s);
  }
  return out;
}

// Calls body(segment, first, last) for the element ranges of all segments, in one parallel loop.
template <typename Body>
void for_all(const std::vector<Segment>& segs, const Body& body) {
  int64_t total = 0;
  for (const auto& s : segs) total += s.size;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (const auto& s : segs) {
      const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + s.size);
      if (lo < hi) body(s, lo - offset, hi - offset);
      offset += s.size;
    }
  });
}

inline fVec square_root(const fVec& x) { return x.sqrt(); }
inline float square_root(float x) { return std::sqrt(x); }

// Applies `update` to every element of every segment, fVec::size() floats at a time and then one
// at a time for the tail: update(g, w, state1, state2) gets the fp32 gradient and weight (fVec or
// float alike), may change the two state values it is given by reference, and returns the new
// weight, which is stored with its bf16 copy. kStates: how many state tensors there are (0-2).
template <int kStates, typename Update>
void update_all(const std::vector<Segment>& segs, const Update& update) {
  for_all(segs, [&](const Segment& s, int64_t lo, int64_t hi) {
    constexpr int64_t V = fVec::size();
    int64_t i = lo;
    for (; i + V <= hi; i += V) {
      fVec s1 = kStates > 0 ? fVec::loadu(s.state1 + i) : fVec(0.f);
      fVec s2 = kStates > 1 ? fVec::loadu(s.state2 + i) : fVec(0.f);
      const fVec w = update(at::vec::convert<float>(bVec::loadu(s.grad + i, V)), fVec::loadu(s.weight + i), s1, s2);
      if (kStates > 0) s1.store(s.state1 + i);
      if (kStates > 1) s2.store(s.state2 + i);
      w.store(s.weight + i);
      at::vec::convert<BFloat16>(w).store(s.copy + i, V);
    }
    for (; i < hi; ++i) {
      float s1 = kStates > 0 ? s.state1[i] : 0.f, s2 = kStates > 1 ? s.state2[i] : 0.f;
      const float w = update(static_cast<float>(s.grad[i]), s.weight[i], s1, s2);
      if (kStates > 0) s.state1[i] = s1;
      if (kStates > 1) s.state2[i] = s2;
      s.weight[i] = w;
      s.copy[i] = static_cast<BFloat16>(w);
    }
  });
}

// torch.optim.SGD (fused CPU kernel): d = g + wd*w; b = first ? d : m*b + d; d = nesterov ? d + m*b : b;
// w -= lr*d. No dampening (the trainer never sets it).
void sgd(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> copies, std::vector<torch::Tensor> grads,
         std::vector<torch::Tensor> momentum_buffers, double lr, double momentum, double weight_decay, bool nesterov,
         bool first_step) {
  const bool use_momentum = momentum != 0;
  TORCH_CHECK(!use_momentum || !momentum_buffers.empty(), "momentum needs momentum buffers");
  const auto segs = segments(weights, copies, grads, use_momentum ? momentum_buffers : std::vector<torch::Tensor>{}, {});
  const float lr_ = lr, m = momentum, wd = weight_decay;
  const auto update = [&](auto d, auto w, auto& b, auto&) {
    using T = decltype(d);
    if (wd != 0.f) d = d + w * T(wd);
    if (use_momentum) {
      b = first_step ? d : b * T(m) + d;
      d = nesterov ? d + b * T(m) : b;
    }
    return w - d * T(lr_);
  };
  if (use_momentum) update_all<1>(segs, update);
  else update_all<0>(segs, update);
}

// torch.optim.Adam / AdamW (fused CPU kernel, no amsgrad): L2 decay adds wd*w to the gradient,
// decoupled decay (AdamW) scales w by 1 - lr*wd first; m = lerp(m, g, 1 - beta1);
// v = beta2*v + (1 - beta2)*g*g; w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
void adam(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> copies, std::vector<torch::Tensor> grads,
          std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs, double lr, double beta1,
          double beta2, double eps, double weight_decay, bool decoupled, double step) {
  TORCH_CHECK(!exp_avgs.empty() && !exp_avg_sqs.empty(), "Adam needs exp_avg and exp_avg_sq");
  const auto segs = segments(weights, copies, grads, exp_avgs, exp_avg_sqs);
  const float step_size = lr / (1 - std::pow(beta1, step)), bc2 = std::sqrt(1 - std::pow(beta2, step));
  const float b1 = 1 - beta1, b2 = beta2, one_minus_b2 = 1 - beta2, eps_ = eps;
  const float wd = weight_decay, decay = 1 - lr * weight_decay;
  update_all<2>(segs, [&](auto g, auto w, auto& m, auto& v) {
    using T = decltype(g);
    if (wd != 0.f) {
      if (decoupled) w = w * T(decay);
      else g = g + w * T(wd);
    }
    m = m + T(b1) * (g - m);
    v = v * T(b2) + g * g * T(one_minus_b2);
    return w - T(step_size) * m / (square_root(v) / T(bc2) + T(eps_));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd", &sgd, "fused bf16-gradient SGD step that also writes the bf16 weight copies");
  m.def("adam", &adam, "fused bf16-gradient Adam/AdamW step that also writes the bf16 weight copies");
}
