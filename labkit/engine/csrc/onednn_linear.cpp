// x @ W.T (+ bias) through oneDNN's matmul, the weight packed once into the blocked layout oneDNN's
// kernel reads, and one ready primitive per row count: what vLLM's CPU backend does for every linear layer
// (its csrc/cpu/dnnl_helper, `onednn_mm`). labkit/engine/onednn_linear.py builds it and says why it exists;
// tests/test_onednn_linear.py checks it against F.linear.
//
// Two ops:
//   pack(weight [N, K]) -> packed [bytes] uint8       once per weight: reorder into oneDNN's blocked layout
//   linear(x [M, K], packed, bias [N]?, N) -> [M, N]   every call: look up (or create, the first time) the
//                                                      primitive for M rows, run it
// The packed weight is an ordinary tensor of bytes that Python owns (so it lives and dies with the
// engine), and a compiled graph passes it like any other tensor. What depends only on the shape lives
// here, in a cache: the weight's packed layout by (K, N, dtype), and the primitive by (M, K, N, dtype,
// bias, threads). Creating a primitive takes milliseconds; looking one up, well under a microsecond.
// float32, and bfloat16 where this CPU has a kernel for it (never oneDNN's slow reference code).

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <tuple>

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

// The packed layout is chosen for this many rows (a decode batch); every row count then reads it.
constexpr int64_t kPackedForRows = 16;

dnnl::engine& cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& stream() {  // one per thread that calls in
  thread_local dnnl::stream s(cpu());
  return s;
}

memory::data_type dnnl_type(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "labkit_onednn: float32 or bfloat16 tensors only, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? memory::data_type::f32 : memory::data_type::bf16;
}

dnnl::matmul::primitive_desc describe(int64_t m, int64_t k, int64_t n, memory::data_type type,
                                      const memory::desc& weight, bool bias) {
  memory::desc src({m, k}, type, Tag::ab), dst({m, n}, type, Tag::ab);
  if (!bias) return dnnl::matmul::primitive_desc(cpu(), src, weight, dst);
  memory::desc bias_desc({1, n}, type, Tag::ab);
  return dnnl::matmul::primitive_desc(cpu(), src, weight, bias_desc, dst);
}

std::mutex cache_lock;
std::map<std::tuple<int64_t, int64_t, int>, memory::desc> layouts;  // (K, N, type) -> packed layout
// (M, K, N, type, bias, threads) -> primitive: a primitive's work split is fixed when it is created. Every
// prompt length is a new M, so a server would collect them without end: at kMaxPrimitives the map starts
// over (vLLM keeps 128 per layer, LRU), and oneDNN's own primitive cache makes the rebuilt ones cheap.
constexpr size_t kMaxPrimitives = 1024;
std::map<std::tuple<int64_t, int64_t, int64_t, int, bool, int>, dnnl::matmul> primitives;

memory::desc packed_layout(int64_t k, int64_t n, memory::data_type type) {  // holding cache_lock
  auto key = std::make_tuple(k, n, static_cast<int>(type));
  auto found = layouts.find(key);
  if (found != layouts.end()) return found->second;
  auto pd = describe(kPackedForRows, k, n, type, memory::desc({k, n}, type, Tag::any), false);
  std::string impl = pd.impl_info_str();
  TORCH_CHECK(impl.rfind("ref", 0) != 0, "labkit_onednn: no fast oneDNN matmul for this dtype on this CPU (",
              impl, ")");
  return layouts.emplace(key, pd.weights_desc()).first->second;
}

at::Tensor pack(const at::Tensor& weight) {  // weight [N, K]
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "labkit_onednn.pack: a 2-D CPU weight [N, K]");
  auto type = dnnl_type(weight);
  auto w = weight.contiguous();
  int64_t n = w.size(0), k = w.size(1);
  memory::desc layout;
  {
    std::lock_guard<std::mutex> guard(cache_lock);
    layout = packed_layout(k, n, type);
  }
  auto packed = at::empty({static_cast<int64_t>(layout.get_size())}, w.options().dtype(at::kByte));
  // W [N, K] row-major is W.T [K, N] in column-major ("ba"): no transpose copy needed
  memory plain({{k, n}, type, Tag::ba}, cpu(), w.data_ptr());
  memory blocked(layout, cpu(), packed.data_ptr());
  dnnl::reorder(plain, blocked).execute(stream(), plain, blocked);
  stream().wait();
  return packed;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t n) {
  TORCH_CHECK(x.dim() == 2, "labkit_onednn.linear: x must be [rows, in_features], got ", x.sizes());
  auto type = dnnl_type(x);
  int64_t m = x.size(0), k = x.size(1);
  auto out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  auto xc = x.contiguous();
  memory::desc layout;
  dnnl::matmul primitive;
  {
    std::lock_guard<std::mutex> guard(cache_lock);
    layout = packed_layout(k, n, type);
    auto key = std::make_tuple(m, k, n, static_cast<int>(type), bias.has_value(), omp_get_max_threads());
    auto found = primitives.find(key);
    if (found == primitives.end()) {
      if (primitives.size() >= kMaxPrimitives) primitives.clear();
      found = primitives.emplace(key, dnnl::matmul(describe(m, k, n, type, layout, bias.has_value()))).first;
    }
    primitive = found->second;
  }
  TORCH_CHECK(static_cast<size_t>(packed.numel()) == layout.get_size(),
              "labkit_onednn.linear: the packed weight does not match in_features=", k, ", out_features=", n);
  memory src({{m, k}, type, Tag::ab}, cpu(), xc.data_ptr());
  memory weights(layout, cpu(), packed.data_ptr());
  memory dst({{m, n}, type, Tag::ab}, cpu(), out.data_ptr());
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n && b.scalar_type() == x.scalar_type(),
                "labkit_onednn.linear: bias must be [out_features] of x's dtype");
    args.emplace(DNNL_ARG_BIAS, memory({{1, n}, type, Tag::ab}, cpu(), b.data_ptr()));
  }
  primitive.execute(stream(), args);
  stream().wait();
  return out;
}

}  // namespace

TORCH_LIBRARY(labkit_onednn, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(labkit_onednn, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}
