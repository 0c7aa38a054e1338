// NormPropLinear's output-side form of eq. 9 as a C++ autograd node, for ProjectedSGD's native
// backend on the CPU (normprop/native_autograd.py says why; normprop/layers.py,
// _NormPropLinearRows, is the same computation as a Python autograd.Function):
//
//     forward:  out = clamp_min(shift + k * (x W^T), floor)      (no clamp without floor)
//     backward: gz, [d gamma, u / r, d beta] = normprop_layer_backward(g, out, ...)   (C, one pass)
//               d x = gz W,  k_i (G^T x)_i = gz^T x   (left raw in weight.grad for the step)
//
// ``u / r`` (the tangent coefficient the step needs) is returned as the gradient of ``probe``, a
// tensor of the layer's StepLink that nothing reads: autograd's AccumulateGrad then sums it over
// the backwards since the last step, as the Python node sums ``link.tangent``.
//
// The elementwise pass is the C kernel of csrc/projected_sgd.c, whose address Python hands over
// (set_kernels) from the library it already loaded: one copy of that loop, one ABI check.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#ifndef NORMPROP_PARALLEL_MIN
#error "built by normprop/native_autograd.py, which defines NORMPROP_PARALLEL_MIN"
#endif

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename T>
using LayerBackward = void (*)(const T*, const T*, const T*, const T*, const T*, const T*, T*,
                               T*, int64_t, int64_t, int, T, T, int);

LayerBackward<float> kernel_f32 = nullptr;
LayerBackward<double> kernel_f64 = nullptr;

void set_kernels(int64_t f32, int64_t f64) {
  kernel_f32 = reinterpret_cast<LayerBackward<float>>(f32);
  kernel_f64 = reinterpret_cast<LayerBackward<double>>(f64);
}

template <typename T>
void run_kernel(LayerBackward<T> fn, const Tensor& g, const Tensor& out, const Tensor& k,
                const Tensor& shift, const Tensor& gamma, const Tensor& r, Tensor& gz,
                Tensor& stats, bool has_floor, double floor, double inv_c1) {
  TORCH_CHECK(fn != nullptr, "normprop linear_rows: set_kernels was not called");
  const int64_t rows = g.size(0), m = g.size(1);
  const int threads = g.numel() >= NORMPROP_PARALLEL_MIN ? at::get_num_threads() : 1;
  fn(g.const_data_ptr<T>(), out.const_data_ptr<T>(), k.const_data_ptr<T>(),
     shift.const_data_ptr<T>(), gamma.const_data_ptr<T>(), r.const_data_ptr<T>(),
     gz.mutable_data_ptr<T>(), stats.mutable_data_ptr<T>(), rows, m, has_floor,
     static_cast<T>(floor), static_cast<T>(inv_c1), threads);
}

struct LinearRows : public torch::autograd::Function<LinearRows> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& gamma, const Tensor& beta, const Tensor& probe,
                        const Tensor& k, const Tensor& shift, const Tensor& r,
                        std::optional<double> floor, double inv_c1) {
    Tensor out = at::mm(x, weight.t());
    at::addcmul_out(out, shift, out, k);  // in place: the product is not kept (u reads out)
    if (floor) out.clamp_min_(*floor);
    ctx->save_for_backward({x, weight, k, out, shift, gamma, r});
    ctx->saved_data["floor"] = floor ? c10::IValue(*floor) : c10::IValue();
    ctx->saved_data["inv_c1"] = inv_c1;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &k = saved[2], &out = saved[3],
                 &shift = saved[4], &gamma = saved[5], &r = saved[6];
    const c10::IValue floor = ctx->saved_data["floor"];
    const double inv_c1 = ctx->saved_data["inv_c1"].toDouble();
    variable_list result(10);
    if (!grads[0].defined()) return result;
    // Grad mode is on only under create_graph=True: compute first derivatives without a
    // graph, then make differentiating them again a clear error (once_differentiable).
    const bool create_graph = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    const Tensor g = grads[0].contiguous();
    Tensor gz = at::empty_like(g, at::MemoryFormat::Contiguous);
    Tensor stats = at::empty({3, g.size(1)}, g.options());
    const bool has_floor = !floor.isNone();
    const double floor_value = has_floor ? floor.toDouble() : 0.0;
    if (g.scalar_type() == at::kFloat) {
      run_kernel(kernel_f32, g, out, k, shift, gamma, r, gz, stats, has_floor, floor_value,
                 inv_c1);
    } else {
      TORCH_CHECK(g.scalar_type() == at::kDouble, "normprop linear_rows: float32 or float64");
      run_kernel(kernel_f64, g, out, k, shift, gamma, r, gz, stats, has_floor, floor_value,
                 inv_c1);
    }
    if (ctx->needs_input_grad(0)) result[0] = at::mm(gz, weight);
    if (ctx->needs_input_grad(1)) result[1] = at::mm(gz.t(), x);
    if (ctx->needs_input_grad(2)) result[2] = stats[0];
    if (ctx->needs_input_grad(3)) result[3] = stats[2];
    if (ctx->needs_input_grad(4)) result[4] = stats[1];
    if (!create_graph) return result;
    variable_list wrapped;
    for (Tensor& t : result) {
      wrapped.push_back(t.defined() ? t.detach().requires_grad_(true) : t);
    }
    at::AutoGradMode enable(true);
    return torch::autograd::DelayedError(
               "trying to differentiate twice a NormPropLinear gradient from ProjectedSGD's "
               "native backend (first derivatives only; use backend='eager' for higher ones)",
               static_cast<int64_t>(wrapped.size()))
        .apply(std::move(wrapped));
  }
};

Tensor linear_rows(const Tensor& x, const Tensor& weight, const Tensor& gamma, const Tensor& beta,
                   const Tensor& probe, const Tensor& k, const Tensor& shift, const Tensor& r,
                   std::optional<double> floor, double inv_c1) {
  return LinearRows::apply(x, weight, gamma, beta, probe, k, shift, r, floor, inv_c1);
}

}  // namespace

TORCH_LIBRARY(normprop_native, m) {
  m.def("linear_rows(Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor probe, "
        "Tensor k, Tensor shift, Tensor r, float? floor, float inv_c1) -> Tensor");
  m.def("set_kernels(int f32, int f64) -> ()", &set_kernels);
  m.def("abi() -> int", []() -> int64_t { return 1; });
}

TORCH_LIBRARY_IMPL(normprop_native, CompositeImplicitAutograd, m) {
  m.impl("linear_rows", &linear_rows);
}
