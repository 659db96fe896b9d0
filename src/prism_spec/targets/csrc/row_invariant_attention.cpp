// Row-invariant attention for a few query tokens over a KV cache (CPU).
//
// Query i of batch row b attends over a "visible sequence" of keys: the first shared[b][i]
// cache entries, then the cache entries listed in its tail (tree ancestors, itself), in that
// order. Every arithmetic step of one query's attention is a fixed function of that sequence:
// scores and the value sum are accumulated key after key, the softmax normaliser by a
// reduction whose order depends on the sequence length only. Nothing depends on the other
// queries of the call, on the batch size or on the thread count, so a tree node verified
// among others gets the bits a one-token decode step gets through this same kernel.
//
// The cache rows of one key/value head stay in the core's L2 cache, so computing each query
// on its own costs little more than sharing the reads between the queries of a tree.
//
// Built with -ffp-contract=off, so the arithmetic is what the source says: the vector code's
// multiply-adds are explicit fmadd calls, and the scalar tails' a + b * c are never fused.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// The sum of a vector's lanes in a fixed order (at::vec's generic reduction is much slower).
inline float lane_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.0f;
  for (int64_t l = 0; l < Vec::size(); ++l) total = total + lanes[l];
  return total;
#endif
}

// kVecs float vectors from a row of scalar_t (converted in registers).
template <typename scalar_t, int kVecs>
inline void load_floats(const scalar_t* src, Vec* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int c = 0; c < kVecs; ++c) dst[c] = Vec::loadu(src + c * Vec::size());
  } else {
    using Reduced = at::vec::Vectorized<scalar_t>;
    static_assert(Reduced::size() == 2 * Vec::size());
    for (int c = 0; c < kVecs; c += 2) {
      auto [low, high] = at::vec::convert_to_float<scalar_t>(Reduced::loadu(src + c * Vec::size()));
      dst[c] = low;
      dst[c + 1] = high;
    }
  }
}

// Where query row `row` of (b, h) reads its j-th visible key: the leading shared run, then its tail.
struct Visible {
  int64_t shared;
  const int64_t* tail;
  int64_t count;
  inline int64_t operator[](int64_t j) const { return j < shared ? j : tail[j - shared]; }
};

// One query's attention: out = softmax(scale * q.K^T) V over its visible keys, in order.
// kVecs = head dim / Vec::size() (0: any head dim, scalar code).
template <typename scalar_t, int kVecs>
void attend_one(const scalar_t* q, const scalar_t* k, int64_t k_stride, const scalar_t* v, int64_t v_stride,
                const Visible& keys, int64_t dim, float scale, float* scores, float* acc, scalar_t* out) {
  const int64_t count = keys.count;
  if (count == 0) {  // a query that sees no key (a padding row): zeros, as no key has weight
    std::fill(acc, acc + dim, 0.0f);
    at::vec::convert(acc, out, dim);
    return;
  }
  if constexpr (kVecs > 0) {
    Vec q_vec[kVecs], row[kVecs];
    load_floats<scalar_t, kVecs>(q, q_vec);
    for (int64_t j = 0; j < count; ++j) {
      load_floats<scalar_t, kVecs>(k + keys[j] * k_stride, row);
      Vec sum = q_vec[0] * row[0];
      for (int c = 1; c < kVecs; ++c) sum = at::vec::fmadd(q_vec[c], row[c], sum);
      scores[j] = lane_sum(sum) * scale;
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* key = k + keys[j] * k_stride;
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum = sum + static_cast<float>(q[d]) * static_cast<float>(key[d]);
      scores[j] = sum * scale;
    }
  }
  // Softmax weights, normalised before the value sum.
  const float top = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, scores, count);
  at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, scores, scores, count);
  const float total = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, scores, count);
  const float inverse = 1.0f / total;
  at::vec::map([inverse](Vec x) { return x * Vec(inverse); }, scores, scores, count);
  if constexpr (kVecs > 0) {
    Vec sum[kVecs], row[kVecs];
    for (int c = 0; c < kVecs; ++c) sum[c] = Vec(0.0f);
    for (int64_t j = 0; j < count; ++j) {
      load_floats<scalar_t, kVecs>(v + keys[j] * v_stride, row);
      const Vec weight(scores[j]);
      for (int c = 0; c < kVecs; ++c) sum[c] = at::vec::fmadd(weight, row[c], sum[c]);
    }
    for (int c = 0; c < kVecs; ++c) sum[c].store(acc + c * Vec::size());
  } else {
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* value = v + keys[j] * v_stride;
      for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] + scores[j] * static_cast<float>(value[d]);
    }
  }
  at::vec::convert(acc, out, dim);
}

template <typename scalar_t, int kVecs>
void attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const int64_t* shared,
            const int64_t* tail_offsets, const int64_t* tail_index, float scale, at::Tensor& out) {
  const int64_t batch = query.size(0), heads = query.size(1), n = query.size(2), dim = query.size(3);
  const int64_t groups = heads / key.size(1);
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = key.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value.data_ptr<scalar_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const auto qs = query.strides(), ks = key.strides(), vs = value.strides(), os = out.strides();
  int64_t longest = 0;
  for (int64_t row = 0; row < batch * n; ++row) {
    longest = std::max(longest, shared[row] + tail_offsets[row + 1] - tail_offsets[row]);
  }
  // Every (row, head, query) is computed alone, start to end, by one thread: its bits cannot
  // depend on the others or on the thread count.
  at::parallel_for(0, batch * heads * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest), acc(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * n), h = (item / n) % heads, i = item % n, g = h / groups;
      const int64_t row = b * n + i;
      const Visible keys{shared[row], tail_index + tail_offsets[row],
                         shared[row] + tail_offsets[row + 1] - tail_offsets[row]};
      attend_one<scalar_t, kVecs>(q_ptr + b * qs[0] + h * qs[1] + i * qs[2], k_ptr + b * ks[0] + g * ks[1], ks[2],
                                  v_ptr + b * vs[0] + g * vs[1], vs[2], keys, dim, scale, scores.data(), acc.data(),
                                  o_ptr + b * os[0] + i * os[1] + h * os[2]);
    }
  });
}

template <typename scalar_t>
void dispatch_dim(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const int64_t* shared,
                  const int64_t* tail_offsets, const int64_t* tail_index, float scale, at::Tensor& out) {
  // Vector code for head dims of 2, 4, 8 or 16 float vectors (64 and 128 with AVX-512), scalar otherwise.
  const int64_t dim = query.size(3);
  const auto run = [&](auto vecs) {
    attend<scalar_t, decltype(vecs)::value>(query, key, value, shared, tail_offsets, tail_index, scale, out);
  };
  if (dim == 2 * Vec::size()) return run(std::integral_constant<int, 2>{});
  if (dim == 4 * Vec::size()) return run(std::integral_constant<int, 4>{});
  if (dim == 8 * Vec::size()) return run(std::integral_constant<int, 8>{});
  if (dim == 16 * Vec::size()) return run(std::integral_constant<int, 16>{});
  run(std::integral_constant<int, 0>{});
}

}  // namespace

// query [B, heads, n, d], key/value [B, kv_heads, L, d] (last dimension contiguous);
// shared [B * n] and tail_offsets [B * n + 1] / tail_index (CSR) as described above.
// Returns [B, n, heads, d_v] in the query's dtype.
at::Tensor row_invariant_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& shared, const at::Tensor& tail_offsets,
                                   const at::Tensor& tail_index, double scale) {
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "query, key and value must be 4-D");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "query, key and value must share a dtype");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "the last dimension must be contiguous");
  TORCH_CHECK(value.size(3) == query.size(3), "query and value head dims must be equal");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16 ||
                  query.scalar_type() == at::kHalf,
              "float32, bfloat16 or float16 only (the kernel accumulates in float32)");
  const int64_t rows = query.size(0) * query.size(2);
  TORCH_CHECK(shared.numel() == rows && tail_offsets.numel() == rows + 1, "one plan entry per query");
  TORCH_CHECK(shared.scalar_type() == at::kLong && tail_offsets.scalar_type() == at::kLong &&
                  tail_index.scalar_type() == at::kLong,
              "plan tensors must be int64");
  auto shared_c = shared.contiguous(), offsets_c = tail_offsets.contiguous(), index_c = tail_index.contiguous();
  auto out = at::empty({query.size(0), query.size(2), query.size(1), value.size(3)}, query.options());
  const int64_t* plan[] = {shared_c.data_ptr<int64_t>(), offsets_c.data_ptr<int64_t>(), index_c.data_ptr<int64_t>()};
  const float scale_f = static_cast<float>(scale);
  switch (query.scalar_type()) {
    case at::kFloat:
      dispatch_dim<float>(query, key, value, plan[0], plan[1], plan[2], scale_f, out);
      break;
    case at::kBFloat16:
      dispatch_dim<at::BFloat16>(query, key, value, plan[0], plan[1], plan[2], scale_f, out);
      break;
    default:
      dispatch_dim<at::Half>(query, key, value, plan[0], plan[1], plan[2], scale_f, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_invariant_attention", &row_invariant_attention, "Row-invariant attention (see the source)");
}
