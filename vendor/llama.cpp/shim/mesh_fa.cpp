// Flash attention on the CPU for many queries over a long F16 KV cache: the
// cached-prefix shape of an agent turn (hundreds of new tokens, thousands of
// cached ones), where ggml's own CPU kernel is most of the step.
//
// ggml's tiled kernel (ops.cpp, pinned source) takes one query head at a
// time: for each 64-query tile of each head it widens and transposes every
// K tile, widens every V tile and converts every mask value, one scalar at a
// time, so with grouped-query attention the same K/V tile is widened once per
// query head of its group, and the mask once per head. This kernel takes one
// KV head at a time and puts all the query heads that share it side by side
// as the columns of one tile (queries x heads), so each K/V tile is widened
// once for the whole group; scores are computed as K x Q^T, which needs no
// transposed copy of K and leaves the softmax running down the columns, one
// vector op per row; the mask is only read to classify a tile (all visible:
// no add; all hidden: skipped) and added value by value on the few tiles that
// are mixed (the diagonal of a causal batch). Same arithmetic as ggml's: F32
// scores from F16 K widened exactly, an online softmax, F32 accumulation of
// V; only the order of additions differs.
//
// It is linked in front of ggml's entry point with the linker's --wrap
// (CMakeLists.txt): ggml-cpu.c's call lands here, and every case this kernel
// does not take (other types, ALiBi, soft-capping, sinks, few queries, the
// reference mode, too small a work buffer) goes on to ggml's kernel.
//
// Every thread of an op must make the same choice: ggml's kernel synchronises
// its threads (barriers, a shared chunk counter), so threads split between the
// two kernels would pair their barriers wrongly and hang or compute garbage.
// So the choice depends only on the op's tensors and on a setting that never
// changes while the op runs: each context's own, kept per thread pool (the
// shim owns its contexts' pools) and changed only between that context's
// decodes, on the thread that decodes; pools the shim does not own (an RPC
// stage server's) get a constant default.
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

extern "C" {
int32_t mesh_fa_pool_set(const void *pool, int32_t min_queries);
void mesh_fa_pool_clear(const void *pool);
int32_t mesh_fa_default_min_queries(void);
int32_t mesh_fa_shape_ok(int64_t dk, int64_t dv, int64_t group);
void mesh_fa_counts(int64_t *out);
}

#if defined(MESH_FA_WRAP)
extern "C" {
void __real_ggml_compute_forward_flash_attn_ext(const struct ggml_compute_params *params, struct ggml_tensor *dst);
void __wrap_ggml_compute_forward_flash_attn_ext(const struct ggml_compute_params *params, struct ggml_tensor *dst);
}

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int RN = 4;
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int RN = 2;
#else
constexpr int VL = 4;
constexpr int RN = 2;
#endif
constexpr int RM = 6;  // rows per micro-kernel: RM x RN accumulators stay in registers

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

constexpr int COLS = 64;   // query columns (queries x heads of one KV head) per work unit
constexpr int TK = 64;     // KV rows per tile
constexpr int MAX_D = 256; // head sizes this kernel takes (multiples of VL)

// Smallest number of queries in a ubatch this kernel takes, for pools without a setting of their
// own; 0 = never. One query goes to ggml's kernel, which splits the cache over the threads.
constexpr int32_t DEFAULT_MIN_QUERIES = 2;

// Per thread pool settings: a fixed table (one entry per live context's pool), found by pointer.
constexpr int POOLS = 64;
struct PoolSetting {
    std::atomic<const void *> pool{nullptr};
    std::atomic<int32_t> min_queries{DEFAULT_MIN_QUERIES};
};
PoolSetting g_pools[POOLS];

int32_t min_queries_for(const void *pool) {
    for (PoolSetting &p : g_pools)
        if (pool && p.pool.load(std::memory_order_acquire) == pool) return p.min_queries.load(std::memory_order_relaxed);
    return DEFAULT_MIN_QUERIES;
}

// Flash-attention ops computed here and handed to ggml's kernel (counted once per op, by thread 0).
std::atomic<int64_t> g_taken{0}, g_passed{0};

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// e^x for x <= 88: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by
// its Taylor series to r^7 (the next term is below float rounding there).
// Below -87 (masked scores, underflow) the result is exactly 0.
inline vf vexp(vf x) {
    const vf lo = splat(-87.0f);
    const vi dead = x < lo;
    x = x < lo ? lo : x;
    x = x > splat(88.0f) ? splat(88.0f) : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf n = (x * splat(1.44269504088896341f) + magic) - magic;
    const vf r = (x - n * splat(0.693145751953125f)) - n * splat(1.428606820309417232e-6f);
    vf p = splat(1.0f / 5040.0f);
    p = p * r + splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    const vf e = p * scale;
    return dead ? splat(0.0f) : e;
}

// S[k][c] = sum_d K[k][d] * QT[d][c] for rows k0..k0+R, column vectors c0..c0+N*VL.
template <int R, int N>
inline void kq_block(float *S, const float *K, const float *QT, int k0, int c0, int dk, int ld) {
    vf acc[R][N];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < N; j++) acc[i][j] = splat(0.0f);
    for (int d = 0; d < dk; d++) {
        vf b[N];
        for (int j = 0; j < N; j++) b[j] = load(QT + d * ld + c0 + j * VL);
        for (int i = 0; i < R; i++) {
            const vf a = splat(K[(k0 + i) * dk + d]);
            for (int j = 0; j < N; j++) acc[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < N; j++) store(S + (k0 + i) * ld + c0 + j * VL, acc[i][j]);
}

// O[c][v] += sum_k P[k][c] * V[k][v] for columns c0..c0+R, value vectors v0..v0+N*VL.
template <int R, int N>
inline void pv_block(float *O, const float *P, const float *V, int c0, int v0, int kt, int ld, int dv) {
    vf acc[R][N];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < N; j++) acc[i][j] = load(O + (c0 + i) * dv + v0 + j * VL);
    for (int k = 0; k < kt; k++) {
        vf b[N];
        for (int j = 0; j < N; j++) b[j] = load(V + k * dv + v0 + j * VL);
        for (int i = 0; i < R; i++) {
            const vf a = splat(P[k * ld + c0 + i]);
            for (int j = 0; j < N; j++) acc[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < N; j++) store(O + (c0 + i) * dv + v0 + j * VL, acc[i][j]);
}

template <int R>
inline void kq_rows(float *S, const float *K, const float *QT, int k0, int ncols, int dk, int ld) {
    int c0 = 0;
    for (; c0 + RN * VL <= ncols; c0 += RN * VL) kq_block<R, RN>(S, K, QT, k0, c0, dk, ld);
    for (; c0 < ncols; c0 += VL) kq_block<R, 1>(S, K, QT, k0, c0, dk, ld);
}

template <int R>
inline void pv_cols(float *O, const float *P, const float *V, int c0, int kt, int ld, int dv) {
    int v0 = 0;
    for (; v0 + RN * VL <= dv; v0 += RN * VL) pv_block<R, RN>(O, P, V, c0, v0, kt, ld, dv);
    for (; v0 < dv; v0 += VL) pv_block<R, 1>(O, P, V, c0, v0, kt, ld, dv);
}

// Head sizes and grouping this kernel computes.
bool shape_ok(int64_t dk, int64_t dv, int64_t group) {
    return dk > 0 && dv > 0 && dk % VL == 0 && dv % VL == 0 && dk <= MAX_D && dv <= MAX_D && group >= 1 && group <= COLS;
}

struct Shape {
    const ggml_tensor *q, *k, *v, *mask;
    ggml_tensor *dst;
    int64_t dk, dv, nq, nkv, nh, nhkv, group, tq;
    float scale;
};

// Floats of work buffer one thread needs.
inline size_t scratch_floats(int64_t dk, int64_t dv) {
    const size_t n = (size_t)(dk * COLS + TK * dk + TK * dv + TK * COLS + COLS * dv + 3 * COLS);
    return (n + 15) & ~(size_t)15;
}

enum TileMask { VISIBLE, HIDDEN, MIXED };

// The mask row of query position iq1, query head h, batch iq3.
inline const ggml_fp16_t *mask_row(const ggml_tensor *m, int64_t iq1, int64_t h, int64_t iq3) {
    return (const ggml_fp16_t *)((const char *)m->data + iq1 * m->nb[1] + (h % m->ne[2]) * m->nb[2] + (iq3 % m->ne[3]) * m->nb[3]);
}

// Whether every KV cell query a sees, query b sees too: true of two queries of one sequence (a
// before b, causal), false when they belong to sequences that do not share those cells. Columns
// of different sequences in one work unit would compute every tile any of them sees; ggml's
// kernel, which skips hidden cells one by one, is the faster one for such batches (several
// streams' single-token steps).
bool nested(const ggml_tensor *m, int64_t a, int64_t b, int64_t nkv) {
    const uint16_t *ra = (const uint16_t *)mask_row(m, a, 0, 0);
    const uint16_t *rb = (const uint16_t *)mask_row(m, b, 0, 0);
    for (int64_t i = 0; i < nkv; i++)
        if (ra[i] != 0xfc00 && rb[i] == 0xfc00) return false;
    return true;
}

// How the mask treats KV rows ic..ic+kt for the unit's columns.
TileMask classify(const Shape &s, int64_t iq3, int64_t h0, int64_t q0, int64_t nqb, int64_t ic, int64_t kt) {
    if (!s.mask) return VISIBLE;
    const ggml_tensor *m = s.mask;
    const int64_t heads = m->ne[2] == 1 ? 1 : s.group;
    bool zero = true, ninf = true;
    for (int64_t hh = 0; hh < heads; hh++) {
        for (int64_t t = 0; t < nqb; t++) {
            const uint16_t *row = (const uint16_t *)mask_row(m, q0 + t, h0 + hh, iq3) + ic;
            for (int64_t i = 0; i < kt; i++) {
                const uint16_t b = row[i];
                zero &= (b & 0x7fff) == 0;
                ninf &= b == 0xfc00;
            }
        }
    }
    return zero ? VISIBLE : ninf ? HIDDEN : MIXED;
}

// One work unit: queries q0..q0+nqb of every query head sharing KV head g, batch iq3.
void run_unit(const Shape &s, float *w, int64_t iq3, int64_t g, int64_t q0, int64_t nqb) {
    const int64_t dk = s.dk, dv = s.dv, group = s.group;
    const int ncols = (int)(nqb * group);
    const int ld = (ncols + VL - 1) / VL * VL;
    float *QT = w;
    float *Kf = QT + dk * COLS;
    float *Vf = Kf + TK * dk;
    float *S = Vf + TK * dv;
    float *O = S + TK * COLS;
    float *M = O + COLS * dv;
    float *L = M + COLS;
    float *A = L + COLS;
    const int64_t h0 = g * group;

    // Column c = t * group + hh: query q0 + t of head h0 + hh, scaled; padding columns are zero.
    for (int64_t d = 0; d < dk; d++)
        for (int c = ncols; c < ld; c++) QT[d * ld + c] = 0.0f;
    for (int64_t t = 0; t < nqb; t++) {
        for (int64_t hh = 0; hh < group; hh++) {
            const float *pq = (const float *)((const char *)s.q->data + (q0 + t) * s.q->nb[1] + (h0 + hh) * s.q->nb[2] +
                                              iq3 * s.q->nb[3]);
            const int64_t c = t * group + hh;
            for (int64_t d = 0; d < dk; d++) QT[d * ld + c] = pq[d] * s.scale;
        }
    }
    for (int c = 0; c < ld; c++) {
        M[c] = -INFINITY;
        L[c] = 0.0f;
    }
    memset(O, 0, sizeof(float) * (size_t)ncols * (size_t)dv);

    const int64_t ik3 = iq3 / (s.q->ne[3] / s.k->ne[3]);
    const int64_t iv3 = ik3;
    for (int64_t ic = 0; ic < s.nkv; ic += TK) {
        const int kt = (int)(s.nkv - ic < TK ? s.nkv - ic : TK);
        const TileMask tm = classify(s, iq3, h0, q0, nqb, ic, kt);
        if (tm == HIDDEN) continue;

        for (int i = 0; i < kt; i++) {
            const ggml_fp16_t *kr = (const ggml_fp16_t *)((const char *)s.k->data + (ic + i) * s.k->nb[1] + g * s.k->nb[2] +
                                                          ik3 * s.k->nb[3]);
            ggml_cpu_fp16_to_fp32(kr, Kf + i * dk, dk);
        }
        int k0 = 0;
        for (; k0 + RM <= kt; k0 += RM) kq_rows<RM>(S, Kf, QT, k0, ld, (int)dk, ld);
        for (; k0 < kt; k0++) kq_rows<1>(S, Kf, QT, k0, ld, (int)dk, ld);

        // Hidden cells are -inf whatever K holds (an overflowed inf or NaN there must not reach
        // a column that cannot see it), and a V row no column sees is not read (0 x inf = NaN).
        bool seen[TK] = {};
        if (tm == MIXED) {
            const ggml_tensor *m = s.mask;
            float row32[TK];
            for (int64_t t = 0; t < nqb; t++) {
                for (int64_t hh = 0; hh < group; hh++) {
                    if (hh == 0 || m->ne[2] > 1) ggml_cpu_fp16_to_fp32(mask_row(m, q0 + t, h0 + hh, iq3) + ic, row32, kt);
                    const int64_t c = t * group + hh;
                    for (int i = 0; i < kt; i++) {
                        const bool hidden = row32[i] == -INFINITY;
                        S[i * ld + c] = hidden ? -INFINITY : S[i * ld + c] + row32[i];
                        seen[i] |= !hidden;
                    }
                }
            }
        }

        // Online softmax down each column: new running max, rescale of what was summed, P = e^(S - max).
        for (int c0 = 0; c0 < ld; c0 += VL) {
            vf mx = splat(-INFINITY);
            for (int i = 0; i < kt; i++) mx = vmax(mx, load(S + i * ld + c0));
            const vf mold = load(M + c0);
            const vf mnew = vmax(mold, mx);
            // A column with nothing visible yet keeps max -inf: P = 0, and alpha = 0 over an empty sum.
            const vf msafe = mnew == splat(-INFINITY) ? splat(0.0f) : mnew;
            const vf alpha = vexp(mold - msafe);
            vf sum = splat(0.0f);
            for (int i = 0; i < kt; i++) {
                const vf p = vexp(load(S + i * ld + c0) - msafe);
                store(S + i * ld + c0, p);
                sum += p;
            }
            store(L + c0, load(L + c0) * alpha + sum);
            store(M + c0, mnew);
            store(A + c0, alpha);
        }
        for (int c = 0; c < ncols; c++) {
            if (A[c] == 1.0f) continue;
            float *o = O + c * dv;
            const vf a = splat(A[c]);
            for (int64_t j = 0; j < dv; j += VL) store(o + j, load(o + j) * a);
        }

        for (int i = 0; i < kt; i++) {
            const ggml_fp16_t *vr = (const ggml_fp16_t *)((const char *)s.v->data + (ic + i) * s.v->nb[1] + g * s.v->nb[2] +
                                                          iv3 * s.v->nb[3]);
            if (tm == MIXED && !seen[i])
                memset(Vf + i * dv, 0, sizeof(float) * (size_t)dv);
            else
                ggml_cpu_fp16_to_fp32(vr, Vf + i * dv, dv);
        }
        int c0 = 0;
        for (; c0 + RM <= ncols; c0 += RM) pv_cols<RM>(O, S, Vf, c0, kt, ld, (int)dv);
        for (; c0 < ncols; c0++) pv_cols<1>(O, S, Vf, c0, kt, ld, (int)dv);
    }

    // dst is [dv, heads, queries, batch]: row (query, head).
    const ggml_tensor *dst = s.dst;
    for (int64_t t = 0; t < nqb; t++) {
        for (int64_t hh = 0; hh < group; hh++) {
            const int64_t c = t * group + hh;
            const float inv = L[c] == 0.0f ? 0.0f : 1.0f / L[c];
            float *out = (float *)((char *)dst->data + (iq3 * dst->ne[2] * dst->ne[1] + (h0 + hh) + (q0 + t) * dst->ne[1]) * dst->nb[1]);
            const float *o = O + c * dv;
            for (int64_t j = 0; j < dv; j++) out[j] = o[j] * inv;
        }
    }
}

// The shape when this kernel takes the op, else false.
bool take(const ggml_compute_params *params, ggml_tensor *dst, Shape &s) {
    const int32_t min_q = min_queries_for(params->threadpool);
    if (min_q <= 0 || params->use_ref) return false;
    const ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    if (dst->src[4]) return false;  // attention sinks
    if (q->type != GGML_TYPE_F32 || k->type != GGML_TYPE_F16 || v->type != GGML_TYPE_F16) return false;
    if (mask && mask->type != GGML_TYPE_F16) return false;
    if (dst->type != GGML_TYPE_F32 || dst->nb[0] != sizeof(float)) return false;
    float scale, max_bias, softcap;
    memcpy(&scale, (const float *)dst->op_params + 0, sizeof(float));
    memcpy(&max_bias, (const float *)dst->op_params + 1, sizeof(float));
    memcpy(&softcap, (const float *)dst->op_params + 2, sizeof(float));
    if (max_bias != 0.0f || softcap != 0.0f) return false;
    if (q->nb[0] != sizeof(float) || k->nb[0] != sizeof(ggml_fp16_t) || v->nb[0] != sizeof(ggml_fp16_t)) return false;
    if (k->ne[1] != v->ne[1] || k->ne[2] != v->ne[2] || k->ne[3] != v->ne[3]) return false;
    if (k->ne[2] <= 0 || q->ne[2] % k->ne[2] || q->ne[3] % k->ne[3]) return false;
    const int64_t dk = k->ne[0], dv = v->ne[0], group = q->ne[2] / k->ne[2];
    if (q->ne[0] != dk || !shape_ok(dk, dv, group) || q->ne[1] < min_q) return false;
    if (dst->ne[0] != dv || dst->ne[1] != q->ne[2] || dst->ne[2] != q->ne[1]) return false;
    if (mask && (mask->ne[0] < k->ne[1] || mask->ne[1] < q->ne[1])) return false;
    const size_t need = scratch_floats(dk, dv) * sizeof(float) * (size_t)params->nth;
    if (!params->wdata || params->wsize < need) return false;
    s = Shape{q, k, v, mask, dst, dk, dv, q->ne[1], k->ne[1], q->ne[2], k->ne[2], group, COLS / group, scale};
    // Each work unit's queries should be one sequence's: check the first and last of every block.
    if (mask)
        for (int64_t q0 = 0; q0 < s.nq; q0 += s.tq) {
            const int64_t last = (s.nq - q0 < s.tq ? s.nq : q0 + s.tq) - 1;
            if (!nested(mask, q0, last, s.nkv)) return false;
        }
    return true;
}

}  // namespace

extern "C" {

/** ggml-cpu.c's call to its flash-attention op, redirected here at link time (--wrap). */
void __wrap_ggml_compute_forward_flash_attn_ext(const struct ggml_compute_params *params, struct ggml_tensor *dst) {
    Shape s;
    if (!take(params, dst, s)) {
        if (params->ith == 0) g_passed.fetch_add(1, std::memory_order_relaxed);
        __real_ggml_compute_forward_flash_attn_ext(params, dst);
        return;
    }
    if (params->ith == 0) g_taken.fetch_add(1, std::memory_order_relaxed);
    float *w = (float *)params->wdata + scratch_floats(s.dk, s.dv) * (size_t)params->ith;
    const int64_t blocks = (s.nq + s.tq - 1) / s.tq;
    const int64_t units = s.q->ne[3] * s.nhkv * blocks;
    // Units interleave over the threads; every unit writes its own dst rows, so no barrier is needed.
    for (int64_t u = params->ith; u < units; u += params->nth) {
        const int64_t b = u % blocks;
        const int64_t g = (u / blocks) % s.nhkv;
        const int64_t iq3 = u / (blocks * s.nhkv);
        const int64_t q0 = b * s.tq;
        const int64_t nqb = s.nq - q0 < s.tq ? s.nq - q0 : s.tq;
        run_unit(s, w, iq3, g, q0, nqb);
    }
}

/**
 * Set the smallest ubatch (queries) this kernel takes for ops computed on thread pool `pool`
 * (0: ggml's kernel for all); only while no graph runs on that pool. Returns the setting, or -2
 * when the table is full (the pool then runs the default, as pools the shim does not own).
 */
int32_t mesh_fa_pool_set(const void *pool, int32_t min_queries) {
    if (!pool) return -2;
    const int32_t v = min_queries < 0 ? 0 : min_queries;
    for (PoolSetting &p : g_pools) {
        if (p.pool.load(std::memory_order_acquire) == pool) {
            p.min_queries.store(v, std::memory_order_relaxed);
            return v;
        }
    }
    // A free entry holds the default until its pool is set, so a lookup in between reads the default.
    for (PoolSetting &p : g_pools) {
        const void *empty = nullptr;
        if (p.pool.compare_exchange_strong(empty, pool, std::memory_order_acq_rel)) {
            p.min_queries.store(v, std::memory_order_relaxed);
            return v;
        }
    }
    return -2;
}

/** Forget a pool's setting (before the pool is freed: its address may come back for another). */
void mesh_fa_pool_clear(const void *pool) {
    if (!pool) return;
    for (PoolSetting &p : g_pools) {
        if (p.pool.load(std::memory_order_acquire) == pool) {
            // The default goes back before the entry is free: a pool taking it next must not have
            // its own setting overwritten by this one's late reset.
            p.min_queries.store(DEFAULT_MIN_QUERIES, std::memory_order_relaxed);
            p.pool.store(nullptr, std::memory_order_release);
            return;
        }
    }
}

/** The setting pools the shim does not own (or cannot keep an entry for) run with. */
int32_t mesh_fa_default_min_queries(void) { return DEFAULT_MIN_QUERIES; }

/** Whether this kernel would compute a model's attention: head sizes K and V, query heads per KV head. */
int32_t mesh_fa_shape_ok(int64_t dk, int64_t dv, int64_t group) { return shape_ok(dk, dv, group) ? 1 : 0; }

/** Flash-attention ops so far in this process: out[0] computed by this kernel, out[1] by ggml's. */
void mesh_fa_counts(int64_t *out) {
    out[0] = g_taken.load(std::memory_order_relaxed);
    out[1] = g_passed.load(std::memory_order_relaxed);
}

}  // extern "C"

#else  // no --wrap on this platform's linker: ggml's kernel only

/** Not built on this platform: always -1. */
extern "C" int32_t mesh_fa_pool_set(const void *, int32_t) { return -1; }

/** Not built on this platform: nothing to forget. */
extern "C" void mesh_fa_pool_clear(const void *) {}

/** Not built on this platform: never. */
extern "C" int32_t mesh_fa_default_min_queries(void) { return 0; }

/** Not built on this platform: no model's attention. */
extern "C" int32_t mesh_fa_shape_ok(int64_t, int64_t, int64_t) { return 0; }

/** Not built on this platform: no counts. */
extern "C" void mesh_fa_counts(int64_t *out) { out[0] = out[1] = 0; }

#endif
