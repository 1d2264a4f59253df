// Decode attention over the paged KV cache, one query per sequence: the loop a CPU serving engine runs for
// it (vLLM's csrc/cpu attention, SGLang's decode_attention_cpu), written to be read. labkit/engine/
// paged_kernel.py builds it and says why it exists; attention.decode_attention is the reference it is
// tested against (tests/test_paged_kernel.py).
//
// Layouts (labkit/engine/kv_cache.py), per layer:
//   q        [B, heads, D]                        one query per sequence
//   k_cache  [kv_heads, num_blocks, D, block]     K transposed within a block: for one dimension d, the
//                                                 block's keys lie side by side
//   v_cache  [kv_heads, num_blocks * block, D]    one row of D values per slot
//   tables   [B, M] int64                         each sequence's first M block ids (padded past its end)
//   lens     [B] int64                            keys each sequence attends to, its new one included
//
// One task per (sequence, KV head): the `group` query heads that share the KV head are done together, so
// each block of K and each row of V is read once for all of them (grouped-query attention's saving):
//   1. scores[g, t] = scale * q[g] . k[t]  for t < len   (block by block: for each d, one multiply-add
//                                                         over the block's keys, which lie side by side)
//   2. p[g, t] = exp(scores - max) / sum                  (in float, vectorised with ATen's Vectorized)
//   3. out[g]  = sum_t p[g, t] * v[t]                     (row by row: one multiply-add over D)
// Sums are kept in float whatever the cache's dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void attend_one(const T* q,            // [group, D]: the query heads of one KV head
                const T* k_head,       // [num_blocks, D, block]: that KV head's keys
                const T* v_head,       // [num_blocks * block, D]: its values
                const int64_t* table,  // [M]: the sequence's blocks
                int64_t len, int64_t group, int64_t D, int64_t block, float scale,
                std::vector<float>& buffer,  // scratch, reused across tasks of a thread
                T* out) {                    // [group, D]
  const int64_t n_blocks = (len + block - 1) / block, width = n_blocks * block;
  buffer.assign(group * (width + 2 * D + 1), 0.f);
  float* scores = buffer.data();         // [group, width]
  float* qf = scores + group * width;    // [group, D]: q * scale, in float
  float* acc = qf + group * D;           // [group, D]: the weighted sum of values
  float* total = acc + group * D;        // [group]: each query head's softmax denominator
  for (int64_t i = 0; i < group * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;

  // 1. block j of K is [D, block]: each dimension adds q[g, d] times a row of the block's keys. Where a
  //    block is one vector of floats (16 keys with AVX-512), the block's scores stay in a register.
  for (int64_t j = 0; j < n_blocks; ++j) {
    const T* kb = k_head + table[j] * D * block;
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * width + j * block;
      if constexpr (std::is_same_v<T, float>) {
        if (block == Vec::size()) {
          Vec sum(0.f);
          for (int64_t d = 0; d < D; ++d) sum = at::vec::fmadd(Vec(qf[g * D + d]), Vec::loadu(kb + d * block), sum);
          sum.store(s);
          continue;
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qf[g * D + d];
        const T* krow = kb + d * block;
        for (int64_t o = 0; o < block; ++o) s[o] += qd * static_cast<float>(krow[o]);
      }
    }
  }

  // 2. softmax over each query head's first len scores (the rest of the last block is not a key)
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * width;
    const float top = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, len);
    at::vec::map([top](Vec x) { return (x - Vec(top)).exp_u20(); }, s, s, len);
    total[g] = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s, len);
  }

  // 3. out[g] = sum over keys of p[g, t] * v[t]: each value row read once for the whole group
  for (int64_t t = 0; t < len; ++t) {
    const T* vrow = v_head + (table[t / block] * block + t % block) * D;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * width + t];
      float* a = acc + g * D;
      if constexpr (std::is_same_v<T, float>) {
        if (D % Vec::size() == 0) {
          for (int64_t d = 0; d < D; d += Vec::size())
            at::vec::fmadd(Vec(p), Vec::loadu(vrow + d), Vec::loadu(a + d)).store(a + d);
          continue;
        }
      }
      for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vrow[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] / total[g]);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& tables, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 3,
              "paged_decode_attention: q [B, heads, D], k_cache [kv_heads, blocks, D, block], "
              "v_cache [kv_heads, slots, D]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention runs on a CPU");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and the cache must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && tables.dim() == 2,
              "paged_decode_attention: tables [B, M] and lens [B] must be int64");
  const int64_t B = q.size(0), heads = q.size(1), D = q.size(2);
  const int64_t kv_heads = k_cache.size(0), num_blocks = k_cache.size(1), block = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == D && v_cache.size(2) == D && v_cache.size(0) == kv_heads &&
                  v_cache.size(1) == num_blocks * block && heads % kv_heads == 0,
              "paged_decode_attention: the cache's shape does not match q's heads and head size");
  TORCH_CHECK(tables.size(0) == B && lens.numel() == B, "paged_decode_attention: one table and length per row");
  const int64_t group = heads / kv_heads, M = tables.size(1);

  auto qc = q.contiguous();
  auto kc = k_cache.contiguous();
  auto vc = v_cache.contiguous();
  auto tc = tables.contiguous();
  auto lc = lens.contiguous();
  const int64_t* len_ptr = lc.data_ptr<int64_t>();
  const int64_t* table_ptr = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {  // the loops below trust these: checked once, here
    TORCH_CHECK(len_ptr[b] >= 1 && len_ptr[b] <= M * block, "paged_decode_attention: row ", b, " has ",
                len_ptr[b], " keys; its table holds ", M * block);
    for (int64_t j = 0; j < (len_ptr[b] + block - 1) / block; ++j)
      TORCH_CHECK(table_ptr[b * M + j] >= 0 && table_ptr[b * M + j] < num_blocks, "paged_decode_attention: row ",
                  b, " names block ", table_ptr[b * M + j], " of ", num_blocks);
  }
  auto out = at::empty_like(qc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        attend_one<scalar_t>(qp + (b * heads + h * group) * D, kp + h * num_blocks * D * block,
                             vp + h * num_blocks * block * D, table_ptr + b * M, len_ptr[b], group, D, block,
                             static_cast<float>(scale), buffer, op + (b * heads + h * group) * D);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(labkit_attention, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(labkit_attention, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
