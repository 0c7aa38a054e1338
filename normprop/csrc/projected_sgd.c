/* ProjectedSGD's step for one NormPropLinear weight, in one pass over its rows.
 *
 * For row i of the stored weight V (m rows of n), with n_i = ||V_i|| as the forward read it,
 * R_i = k_i (G^T x)_i the backward's product and t_i its tangent coefficient
 * (normprop/fused_sgd.py, _fused_update):
 *
 *     d_i = n_i R_i - (t_i - lam / n_i) V_i        the SGD direction in unit space, decay included
 *     b_i <- mu b_i + d_i                          torch SGD's momentum (b = NULL: mu = 0, b_i = d_i)
 *     V_i <- V_i - lr n_i b_i                      direction P(w_i - lr b_i): the projected step
 *     out_norms_i = ||V_i||                        for the next forward, summed while V_i is in L1
 *
 * Rows are independent: they are split over `threads` OpenMP threads, and each row's sum runs in
 * one thread in a fixed order, so the result does not depend on the thread count. Built without
 * -ffp-contract, every element is rounded as the eager torch formula rounds it.
 */
#include <math.h>
#include <stdint.h>

#define PSGD_ROWS(NAME, T, SQRT, TINY)                                                         \
    void NAME(T *restrict v, const T *restrict raw, T *restrict b, const T *restrict norms,    \
              const T *restrict tangent, T *restrict out_norms, int64_t m, int64_t n, T lr,    \
              T mu, T lam, int threads) {                                                      \
        int64_t i;                                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")      \
        for (i = 0; i < m; i++) {                                                              \
            const T ni = norms[i] > (TINY) ? norms[i] : (TINY);                                \
            const T c = tangent[i] - lam / ni;                                                 \
            const T step = lr * ni;                                                            \
            T *restrict vr = v + i * n;                                                        \
            const T *restrict rr = raw + i * n;                                                \
            T acc = 0;                                                                         \
            if (b) {                                                                           \
                T *restrict br = b + i * n;                                                    \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t j = 0; j < n; j++) {                                              \
                    const T bj = mu * br[j] + (rr[j] * ni - c * vr[j]);                        \
                    const T vj = vr[j] - step * bj;                                            \
                    br[j] = bj;                                                                \
                    vr[j] = vj;                                                                \
                    acc += vj * vj;                                                            \
                }                                                                              \
            } else {                                                                           \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t j = 0; j < n; j++) {                                              \
                    const T vj = vr[j] - step * (rr[j] * ni - c * vr[j]);                      \
                    vr[j] = vj;                                                                \
                    acc += vj * vj;                                                            \
                }                                                                              \
            }                                                                                  \
            out_norms[i] = SQRT(acc);                                                          \
        }                                                                                      \
    }

PSGD_ROWS(normprop_psgd_rows_f32, float, sqrtf, 1.17549435082228750797e-38f)
PSGD_ROWS(normprop_psgd_rows_f64, double, sqrt, 2.22507385850720138309e-308)

/* Lets the loader check that it has this file's ABI (bumped with any signature change). */
int normprop_psgd_abi(void) { return 1; }
