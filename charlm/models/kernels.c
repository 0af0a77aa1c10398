/* Compiled CPU kernels for charlm's scans, loaded by charlm/models/native.py through ctypes.

   Built twice, once per number type: -DREAL=float -DEXP=expf and -DREAL=double -DEXP=exp.
   Each function splits the batch rows over `threads` OpenMP threads; the OpenMP runtime is the one
   PyTorch has already loaded, so no second pool of threads competes with torch's. Layouts are those
   of charlm.models.selective: dt, u, y (B, T, E); Bt, Ct (B, T, N); At = A transposed (N, E); states
   (B, N, E); all contiguous. The inner loops run along E (contiguous), so the compiler vectorises
   them, exp included.

   Mamba's selective scan, per batch row b, channel e and state index n:
       h_t[n, e] = exp(dt_t[e] At[n, e]) h_{t-1}[n, e] + dt_t[e] u_t[e] B_t[n]
       y_t[e]    = sum_n C_t[n] h_t[n, e]
   The (T, N, E) gates and states never leave the kernel: forward keeps one (N, E) state; backward
   rebuilds a row's gates and states into its thread's scratch (2 T N E + 2 E numbers) and walks them
   back: G_t = dL/dh_t (from y_t and from h_{t+1}), dL/dlog a_t = G_t a_t h_{t-1}, and Δ, A, B, C, u
   by the chain rule.

   The linear scan, per row b and element k of a step's K elements:
       h_t[k] = a_t[k] h_{t-1}[k] + x_t[k],     a, x, h (B, T, K), h0 (B, K)
   backward:  G_t = g_t + a_{t+1} G_{t+1};  dL/dx_t = G_t;  dL/da_t = G_t h_{t-1};  dL/dh0 = a_1 G_1.

   The causal depthwise convolution (Mamba's and Hawk's CausalConv), per row b, step t, channel e:
       y_t[e] = bias[e] + sum_k wT[k, e] xs_{t+k}[e],     k = 0 .. K-1 in this order,
   where xs = (the K-1 inputs before this call, from `win` (B, K-1, E); then x (B, T, E)). backward:
   d_xs (B, K-1+T, E), zeroed by the caller, gets sum_k wT[k, e] gy_{s-k}[e]; d_wT (K, E) and d_bias (E)
   accumulate one block per thread, summed by the caller.
*/
#include <math.h>
#include <omp.h>
#include <string.h>

void selective_forward(long B, long T, long E, long N, const REAL *dt, const REAL *At, const REAL *Bt,
                       const REAL *Ct, const REAL *u, const REAL *h0, REAL *y, REAL *hT, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        REAL *h = hT + b * N * E;
        memcpy(h, h0 + b * N * E, sizeof(REAL) * N * E);
        for (long t = 0; t < T; t++) {
            const REAL *dt_t = dt + (b * T + t) * E, *u_t = u + (b * T + t) * E;
            const REAL *B_t = Bt + (b * T + t) * N, *C_t = Ct + (b * T + t) * N;
            REAL *y_t = y + (b * T + t) * E;
            for (long e = 0; e < E; e++) y_t[e] = 0;
            for (long n = 0; n < N; n++) {
                const REAL *A_n = At + n * E;
                REAL *h_n = h + n * E, Bn = B_t[n], Cn = C_t[n];
                for (long e = 0; e < E; e++) {
                    REAL v = EXP(dt_t[e] * A_n[e]) * h_n[e] + Bn * dt_t[e] * u_t[e];
                    h_n[e] = v;
                    y_t[e] += Cn * v;
                }
            }
        }
    }
}

void selective_backward(long B, long T, long E, long N, const REAL *dt, const REAL *At, const REAL *Bt,
                        const REAL *Ct, const REAL *u, const REAL *h0, const REAL *gy, const REAL *ghT,
                        REAL *d_dt, REAL *d_At, REAL *d_B, REAL *d_C, REAL *d_u, REAL *d_h0, REAL *scratch,
                        int threads) {
    /* d_At: one (N, E) accumulator per thread, summed by the caller; scratch: one block per thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        int me = omp_get_thread_num();
        REAL *gates = scratch + me * (2 * T * N * E + 2 * E), *states = gates + T * N * E;
        REAL *d_xu = states + T * N * E, *d_la = d_xu + E, *dA = d_At + me * N * E;
        const REAL *start = h0 + b * N * E;
        for (long t = 0; t < T; t++) {  /* rebuild a_t and h_t, (N, E) each */
            const REAL *dt_t = dt + (b * T + t) * E, *u_t = u + (b * T + t) * E, *B_t = Bt + (b * T + t) * N;
            const REAL *prev = t ? states + (t - 1) * N * E : start;
            REAL *a = gates + t * N * E, *h = states + t * N * E;
            for (long n = 0; n < N; n++) {
                const REAL *A_n = At + n * E;
                REAL Bn = B_t[n];
                for (long e = 0; e < E; e++) {
                    REAL g = EXP(dt_t[e] * A_n[e]);
                    a[n * E + e] = g;
                    h[n * E + e] = g * prev[n * E + e] + Bn * dt_t[e] * u_t[e];
                }
            }
        }
        REAL *G = d_h0 + b * N * E;  /* dL/dh_t carried back through the gates; ends as dL/dh0 */
        if (ghT) memcpy(G, ghT + b * N * E, sizeof(REAL) * N * E);
        else memset(G, 0, sizeof(REAL) * N * E);
        for (long t = T - 1; t >= 0; t--) {
            const REAL *dt_t = dt + (b * T + t) * E, *u_t = u + (b * T + t) * E;
            const REAL *B_t = Bt + (b * T + t) * N, *C_t = Ct + (b * T + t) * N, *gy_t = gy + (b * T + t) * E;
            const REAL *prev = t ? states + (t - 1) * N * E : start;
            const REAL *a = gates + t * N * E, *h = states + t * N * E;
            for (long e = 0; e < E; e++) d_xu[e] = d_la[e] = 0;
            for (long n = 0; n < N; n++) {
                const REAL *A_n = At + n * E, *a_n = a + n * E, *h_n = h + n * E, *p_n = prev + n * E;
                REAL *G_n = G + n * E, *dA_n = dA + n * E, Bn = B_t[n], Cn = C_t[n], dB = 0, dC = 0;
#pragma omp simd reduction(+ : dB, dC)  /* the arrays are distinct: vectorise without checking */
                for (long e = 0; e < E; e++) {
                    REAL g = G_n[e] + Cn * gy_t[e];
                    REAL la = g * a_n[e] * p_n[e];  /* dL/dlog a_t */
                    dC += h_n[e] * gy_t[e];
                    dB += g * dt_t[e] * u_t[e];
                    d_xu[e] += g * Bn;
                    d_la[e] += la * A_n[e];
                    dA_n[e] += la * dt_t[e];
                    G_n[e] = g * a_n[e];
                }
                d_B[(b * T + t) * N + n] = dB;
                d_C[(b * T + t) * N + n] = dC;
            }
            REAL *ddt_t = d_dt + (b * T + t) * E, *du_t = d_u + (b * T + t) * E;
            for (long e = 0; e < E; e++) {
                ddt_t[e] = d_la[e] + d_xu[e] * u_t[e];
                du_t[e] = d_xu[e] * dt_t[e];
            }
        }
    }
}

void linear_forward(long B, long T, long K, const REAL *a, const REAL *x, const REAL *h0, REAL *h, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        const REAL *prev = h0 + b * K;
        for (long t = 0; t < T; t++) {
            long o = (b * T + t) * K;
            for (long k = 0; k < K; k++) h[o + k] = a[o + k] * prev[k] + x[o + k];
            prev = h + o;
        }
    }
}

void linear_backward(long B, long T, long K, const REAL *a, const REAL *h0, const REAL *h, const REAL *gh,
                     const REAL *ghT, REAL *d_a, REAL *d_x, REAL *d_h0, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        REAL *G = d_h0 + b * K;  /* a_{t+1} G_{t+1}, carried back */
        if (ghT) memcpy(G, ghT + b * K, sizeof(REAL) * K);
        else memset(G, 0, sizeof(REAL) * K);
        for (long t = T - 1; t >= 0; t--) {
            long o = (b * T + t) * K;
            const REAL *prev = t ? h + o - K : h0 + b * K;
            for (long k = 0; k < K; k++) {
                REAL g = G[k] + gh[o + k];
                d_x[o + k] = g;
                d_a[o + k] = g * prev[k];
                G[k] = g * a[o + k];
            }
        }
    }
}

static inline const REAL *conv_input(const REAL *x, const REAL *win, long b, long T, long E, long K, long s) {
    /* xs_s of row b: the window for s < K-1, else x_{s-(K-1)} */
    return s < K - 1 ? win + (b * (K - 1) + s) * E : x + (b * T + s - (K - 1)) * E;
}

void conv_forward(long B, long T, long E, long K, const REAL *x, const REAL *win, const REAL *wT, const REAL *bias,
                  REAL *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long t = 0; t < T; t++) {
            REAL *y_t = y + (b * T + t) * E;
            for (long e = 0; e < E; e++) y_t[e] = bias[e];
            for (long k = 0; k < K; k++) {
                const REAL *xs = conv_input(x, win, b, T, E, K, t + k), *w = wT + k * E;
#pragma omp simd
                for (long e = 0; e < E; e++) y_t[e] += w[e] * xs[e];
            }
        }
    }
}

void conv_backward(long B, long T, long E, long K, const REAL *x, const REAL *win, const REAL *wT, const REAL *gy,
                   REAL *d_xs, REAL *d_wT, REAL *d_bias, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) {
        int me = omp_get_thread_num();
        REAL *dw = d_wT + me * K * E, *db = d_bias + me * E;
        for (long t = 0; t < T; t++) {
            const REAL *g = gy + (b * T + t) * E;
            for (long e = 0; e < E; e++) db[e] += g[e];
            for (long k = 0; k < K; k++) {
                const REAL *xs = conv_input(x, win, b, T, E, K, t + k), *w = wT + k * E;
                REAL *dxs = d_xs + (b * (T + K - 1) + t + k) * E, *dw_k = dw + k * E;
#pragma omp simd
                for (long e = 0; e < E; e++) {
                    dxs[e] += w[e] * g[e];
                    dw_k[e] += g[e] * xs[e];
                }
            }
        }
    }
}
