// Step 1 of the eval forward: everything that reads x.
//   stem: x @ [W_1x1 | W_red3 | W_red5] + b, ReLU. Branch 1 goes to its output slice,
//         the reduce columns into zero-bordered maps that step 2 convolves in place.
//   pool: 3x3/s1/p1 max of a pixel block, kept in a per-thread buffer that stays in
//         cache, times W_pool + b, ReLU, into its output slice. The pooled tensor is
//         never materialised.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "inception_cpu.h"

namespace inception_cpu {
namespace {

// pooled[i, :] = max of x over the 3x3 window around pixel m0 + i, clipped at the
// borders (max_pool2d(3, stride 1, padding 1); ceil_mode changes nothing at stride 1;
// a NaN in the window gives NaN, as there).
template <typename T>
void max_pool_tile(const T* x, const Shape& s, int64_t c_in, int64_t m0, int64_t rows,
                   T* pooled) {
  for_each_pixel(s, m0, rows, [&](int64_t i, int64_t n, int64_t h, int64_t w) {
    T* dst = pooled + i * c_in;
    std::copy_n(x + (m0 + i) * c_in, c_in, dst);  // the centre is always inside
    for (int64_t hh = std::max<int64_t>(h - 1, 0); hh <= std::min(h + 1, s.height - 1);
         ++hh) {
      for (int64_t ww = std::max<int64_t>(w - 1, 0); ww <= std::min(w + 1, s.width - 1);
           ++ww) {
        const T* src = x + ((n * s.height + hh) * s.width + ww) * c_in;
        for_each_lane_group<T>(c_in, [&](auto lanes, int64_t c) {
          using U = decltype(lanes);
          store(dst + c, nan_max(load<U>(dst + c), load<U>(src + c)));
        });
      }
    }
  });
}

enum class Target { kBranch1, kReduce3, kReduce5, kPool };

struct ColumnJob {
  Target target;
  int64_t begin, end;
};

}  // namespace

template <typename T>
void pointwise_step(const T* x, const Shape& shape, int64_t c_in,
                    const Weights<T>& branch1, const Weights<T>& reduce3,
                    const Weights<T>& reduce5, const Weights<T>& pool_proj,
                    const OutputSlice<T>& out1, const OutputSlice<T>& out_pool,
                    const PaddedMap<T>& red3, const PaddedMap<T>& red5) {
  zero_border(red3, shape);
  zero_border(red5, shape);

  // Every pixel block runs these jobs. Stem columns are chunked for parallelism; the
  // pool projection stays whole so each block max-pools its tile once.
  std::vector<ColumnJob> jobs;
  for (auto [target, cols] : {std::pair{Target::kBranch1, branch1.cols},
                              std::pair{Target::kReduce3, reduce3.cols},
                              std::pair{Target::kReduce5, reduce5.cols}})
    for (int64_t j = 0; j < cols; j += chunk_cols<T>())
      jobs.push_back({target, j, std::min(cols, j + chunk_cols<T>())});
  jobs.push_back({Target::kPool, 0, pool_proj.cols});

  const int64_t pixels = shape.pixels();
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  std::vector<T> pool_buffers(at::get_num_threads() * kBlockRows * c_in);
  const KLayout one_run{1, c_in, 0};

  parallel_tasks(ceil_div(pixels, kBlockRows) * n_jobs, [&](int64_t task) {
    const ColumnJob& job = jobs[task % n_jobs];
    const int64_t m0 = task / n_jobs * kBlockRows;
    const int64_t rows = std::min(kBlockRows, pixels - m0);
    const T* a_rows[kBlockRows];
    T* c_rows[kBlockRows];
    const Weights<T>* weights = &branch1;
    if (job.target == Target::kPool) {
      T* pooled = pool_buffers.data() + omp_get_thread_num() * kBlockRows * c_in;
      max_pool_tile(x, shape, c_in, m0, rows, pooled);
      for (int64_t i = 0; i < rows; ++i) {
        a_rows[i] = pooled + i * c_in;
        c_rows[i] = out_pool.data + (m0 + i) * out_pool.row_stride;
      }
      weights = &pool_proj;
    } else {
      for (int64_t i = 0; i < rows; ++i) a_rows[i] = x + (m0 + i) * c_in;
      if (job.target == Target::kBranch1) {
        for (int64_t i = 0; i < rows; ++i)
          c_rows[i] = out1.data + (m0 + i) * out1.row_stride;
      } else {
        const bool is3 = job.target == Target::kReduce3;
        const PaddedMap<T>& map = is3 ? red3 : red5;
        weights = is3 ? &reduce3 : &reduce5;
        for_each_pixel(shape, m0, rows, [&](int64_t i, int64_t n, int64_t h, int64_t w) {
          c_rows[i] = map.pixel(n, h, w);
        });
      }
    }
    gemm(rows, a_rows, one_run, weights->w, weights->ldb, weights->bias,
                   c_rows, job.begin, job.end);
  });
}

#define INSTANTIATE(T)                                                              \
  template void pointwise_step<T>(const T*, const Shape&, int64_t, const Weights<T>&, \
                                  const Weights<T>&, const Weights<T>&,              \
                                  const Weights<T>&, const OutputSlice<T>&,          \
                                  const OutputSlice<T>&, const PaddedMap<T>&,        \
                                  const PaddedMap<T>&);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace inception_cpu
