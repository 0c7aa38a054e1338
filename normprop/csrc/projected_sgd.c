/* ProjectedSGD's step for one NormPropLinear weight, in one pass over its rows (and, at the end
 * of this file, the part of the layer's backward it drives).
 *
 * For row i of the stored weight V (m rows of n), with n_i = ||V_i|| as the forward read it,
 * R_i = k_i (G^T x)_i the backward's product and t_i its tangent coefficient
 * (normprop/fused_sgd.py, _fused_update):
 *
 *     d_i = n_i R_i - (t_i - lam / n_i) V_i        the SGD direction in unit space, decay included
 *     b_i <- mu b_i + d_i                          torch SGD's momentum (b = NULL: mu = 0, b_i = d_i)
 *     V_i <- V_i - lr n_i b_i                      direction P(w_i - lr b_i): the projected step
 *     out[0][i] = n'_i = ||V_i||                   for the next forward, summed while V_i is in L1
 *
 * and, when gamma is given (already stepped), the per-row constants of the next forward's eq. 9
 * for out = clamp(k_i (W_i . x) + shift_i) (normprop/layers.py, _NormPropLinearRows), in the
 * order torch's ops round them:
 *
 *     out[1][i] = r_i = n'_i + eps,  out[2][i] = k_i = (gamma_i / r_i) inv_c1,
 *     out[3][i] = shift_i = (beta_i - c2) inv_c1   (beta_i itself when inv_c1 = 1, c2 = 0)
 *
 * returning 1 when every gamma_i is non-zero (the backward may then read u from the output).
 *
 * Rows are independent: they are split over `threads` OpenMP threads, and each row's sum runs in
 * one thread in a fixed order, so the result does not depend on the thread count. Built without
 * -ffp-contract, every element is rounded as the eager torch formula rounds it.
 */
#include <math.h>
#include <stdint.h>

/* x86-64: one build for every machine, with the row loops also compiled for AVX2 and AVX-512
 * and the best one picked when the library loads (GCC's function multi-versioning); the
 * baseline build alone is SSE2, half of AVX2's width. Elsewhere, or with -DPSGD_NO_CLONES (a
 * libc without ifunc), the compiler's baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(PSGD_NO_CLONES)
#define PSGD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PSGD_CLONES
#endif

#define PSGD_ROWS(NAME, T, SQRT, TINY)                                                         \
    PSGD_CLONES int NAME(T *restrict v, const T *restrict raw, T *restrict b, const T *restrict norms,     \
             const T *restrict tangent, T *restrict out, int64_t m, int64_t n, T lr, T mu,     \
             T lam, const T *restrict gamma, const T *restrict beta, T eps, T inv_c1, T c2,    \
             int threads) {                                                                    \
        int64_t i;                                                                             \
        int zero = 0;                                                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1) reduction(|:zero)") \
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
            const T norm = SQRT(acc);                                                          \
            out[i] = norm;                                                                     \
            if (gamma) {                                                                       \
                const T r = norm + eps;                                                        \
                T k = gamma[i] / r;                                                            \
                T shift = beta[i];                                                             \
                if (inv_c1 != (T)1) k = k * inv_c1;                                            \
                if (inv_c1 != (T)1 || c2 != (T)0) shift = (shift - c2) * inv_c1;              \
                out[m + i] = r;                                                                \
                out[2 * m + i] = k;                                                            \
                out[3 * m + i] = shift;                                                        \
                zero |= gamma[i] == (T)0;                                                      \
            }                                                                                  \
        }                                                                                      \
        return !zero;                                                                          \
    }

PSGD_ROWS(normprop_psgd_rows_f32, float, sqrtf, 1.17549435082228750797e-38f)
PSGD_ROWS(normprop_psgd_rows_f64, double, sqrt, 2.22507385850720138309e-308)

/* The activation-sized part of the layer's backward while ProjectedSGD's native step drives it
 * (normprop/layers.py, _NormPropLinearRows.backward; out = clamp(k z + shift, floor) saved by
 * the forward, G the incoming gradient, B rows of m units), in one pass over G and out:
 *
 *     g_bi = 0 where out_bi <= floor (has_floor; torch's threshold_backward), else G_bi
 *     gz_bi = g_bi k_i                               for d x = gz W and the product gz^T x
 *     u_i = sum_b g_bi out_bi - shift_i sum_b g_bi    = k_i (G_i . W_i)
 *     stats = [d gamma = u / gamma, tangent = u / r, d beta = inv_c1 sum_b g_bi]
 *
 * Columns are split over threads, one block each; each column's sums run over b in order in
 * one thread. A thread streams its block row by row (the sums stay in L1): walking narrow column
 * chunks down the rows instead touches a new 4 KB page per row and array, which in a training
 * step, where G and out come from memory, cost about twice this order's time (MLP, batch 256). */
#define PSGD_LAYER_BACKWARD(NAME, T)                                                           \
    PSGD_CLONES void NAME(const T *restrict grad, const T *restrict out, const T *restrict k,  \
                          const T *restrict shift, const T *restrict gamma,                    \
                          const T *restrict r, T *restrict gz, T *restrict stats, int64_t rows, \
                          int64_t m, int has_floor, T floor, T inv_c1, int threads) {           \
        T *gsum = stats + 2 * m; /* d beta's slot holds the sum until the end */               \
        T *dot = stats; /* d gamma's slot holds sum_b g out until the end */                    \
        const int64_t chunks = threads > 1 ? threads : 1;                                      \
        const int64_t chunk = ((m + chunks - 1) / chunks + 15) / 16 * 16;                      \
        int64_t c;                                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")      \
        for (c = 0; c < chunks; c++) {                                                         \
            const int64_t lo = c * chunk, hi = lo + chunk < m ? lo + chunk : m;                \
            for (int64_t i = lo; i < hi; i++) {                                                \
                gsum[i] = 0;                                                                   \
                dot[i] = 0;                                                                    \
            }                                                                                  \
            int64_t b = 0;                                                                     \
            /* Four rows per sweep, added in row order: the same sums, a quarter of the         \
             * accumulators' loads and stores. */                                              \
            for (; b + 4 <= rows; b += 4) {                                                    \
                const T *restrict g0 = grad + b * m, *restrict g1 = g0 + m;                    \
                const T *restrict g2 = g1 + m, *restrict g3 = g2 + m;                          \
                const T *restrict o0 = out + b * m, *restrict o1 = o0 + m;                     \
                const T *restrict o2 = o1 + m, *restrict o3 = o2 + m;                          \
                T *restrict z0 = gz + b * m, *restrict z1 = z0 + m;                            \
                T *restrict z2 = z1 + m, *restrict z3 = z2 + m;                                \
                _Pragma("omp simd")                                                            \
                for (int64_t i = lo; i < hi; i++) {                                            \
                    const T a0 = (has_floor && o0[i] <= floor) ? (T)0 : g0[i];                 \
                    const T a1 = (has_floor && o1[i] <= floor) ? (T)0 : g1[i];                 \
                    const T a2 = (has_floor && o2[i] <= floor) ? (T)0 : g2[i];                 \
                    const T a3 = (has_floor && o3[i] <= floor) ? (T)0 : g3[i];                 \
                    const T ki = k[i];                                                         \
                    z0[i] = a0 * ki;                                                           \
                    z1[i] = a1 * ki;                                                           \
                    z2[i] = a2 * ki;                                                           \
                    z3[i] = a3 * ki;                                                           \
                    gsum[i] = (((gsum[i] + a0) + a1) + a2) + a3;                               \
                    dot[i] = (((dot[i] + a0 * o0[i]) + a1 * o1[i]) + a2 * o2[i]) + a3 * o3[i]; \
                }                                                                              \
            }                                                                                  \
            for (; b < rows; b++) {                                                            \
                const T *restrict gr = grad + b * m;                                           \
                const T *restrict orow = out + b * m;                                          \
                T *restrict zr = gz + b * m;                                                   \
                _Pragma("omp simd")                                                            \
                for (int64_t i = lo; i < hi; i++) {                                            \
                    const T g = (has_floor && orow[i] <= floor) ? (T)0 : gr[i];                \
                    zr[i] = g * k[i];                                                          \
                    gsum[i] += g;                                                              \
                    dot[i] += g * orow[i];                                                     \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = lo; i < hi; i++) {                                                \
                const T u = dot[i] - shift[i] * gsum[i];                                       \
                stats[i] = u / gamma[i];                                                       \
                stats[m + i] = u / r[i];                                                       \
                if (inv_c1 != (T)1) gsum[i] = gsum[i] * inv_c1;                                \
            }                                                                                  \
        }                                                                                      \
    }

PSGD_LAYER_BACKWARD(normprop_layer_backward_f32, float)
PSGD_LAYER_BACKWARD(normprop_layer_backward_f64, double)

/* Lets the loader check that it has this file's ABI (bumped with any signature change). */
int normprop_psgd_abi(void) { return 3; }
