// Pointer-only wrapper over llama.h for bun:ffi.
//
// bun:ffi cannot pass or return C structs by value (llama_batch, the params
// structs), so every entry point here takes scalars and pointers only. The
// engine Worker is the only caller; one model + one context per Worker.

#include "llama.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-rpc.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>
#endif

#define MESH_SHIM_VERSION 11

static int g_log_min_level = GGML_LOG_LEVEL_WARN;
static _Thread_local char g_last_error[512];
static _Thread_local int g_last_level = GGML_LOG_LEVEL_NONE;

// llama.cpp reports load failures only through the log; keep the last error
// line per thread so the engine can return it as the reason of a typed error.
static void mesh_log_cb(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    int effective = level == GGML_LOG_LEVEL_CONT ? g_last_level : (int)level;
    if (level != GGML_LOG_LEVEL_CONT) g_last_level = (int)level;
    if (effective >= GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_CONT && text) {
        snprintf(g_last_error, sizeof g_last_error, "%s", text);
        size_t n = strlen(g_last_error);
        while (n > 0 && (g_last_error[n - 1] == '\n' || g_last_error[n - 1] == '\r')) g_last_error[--n] = 0;
    }
    if (effective >= g_log_min_level && g_log_min_level != GGML_LOG_LEVEL_NONE && text) {
        fputs(text, stderr);
    }
}

/** Version of this shim's ABI; the TypeScript side refuses a mismatch. */
int32_t mesh_shim_version(void) { return MESH_SHIM_VERSION; }

/** Initialise backends once per process and route llama.cpp's log through our filter. */
void mesh_init(int32_t log_min_level) {
    static int initialised = 0;
    g_log_min_level = log_min_level;
    llama_log_set(mesh_log_cb, NULL);
    if (!initialised) {
        initialised = 1;
        llama_backend_init();
    }
}

/** Copy the calling thread's last llama.cpp error line into buf; returns its length. */
int32_t mesh_last_error(char *buf, int32_t cap) {
    if (cap <= 0) return 0;
    snprintf(buf, (size_t)cap, "%s", g_last_error);
    int32_t n = (int32_t)strlen(buf);
    g_last_error[0] = 0;
    return n;
}

#define MESH_BACKENDS_MAX 8

#if defined(__linux__) || defined(__APPLE__)
static pthread_mutex_t g_backend_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_backend_paths[MESH_BACKENDS_MAX][1024];
static int32_t g_backend_devices[MESH_BACKENDS_MAX];
static int g_backend_count = 0;
#endif

/**
 * Load a prebuilt ggml backend library (libggml-vulkan.so, libggml-cuda.so) into
 * ggml's device registry. Returns the number of devices it brought (0: the
 * backend loaded but found no device), or -1 with the reason in err (e.g. the
 * dynamic linker's message for a missing libcudart.so.13). Each Worker of a
 * process calls it; a path already loaded is not loaded twice.
 */
int32_t mesh_backend_load(const char *path, char *err, int32_t cap) {
#if defined(__linux__) || defined(__APPLE__)
    if (cap > 0) err[0] = 0;
    pthread_mutex_lock(&g_backend_lock);
    for (int i = 0; i < g_backend_count; i++) {
        if (strcmp(g_backend_paths[i], path) == 0) {
            int32_t n = g_backend_devices[i];
            pthread_mutex_unlock(&g_backend_lock);
            return n;
        }
    }
    if (g_backend_count >= MESH_BACKENDS_MAX || strlen(path) >= sizeof g_backend_paths[0]) {
        pthread_mutex_unlock(&g_backend_lock);
        if (cap > 0) snprintf(err, (size_t)cap, "too many backends or too long a path");
        return -1;
    }
    // Our own dlopen first: ggml only logs why a library would not load, the
    // dynamic linker's message (which dependency is missing) is what a user needs.
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        pthread_mutex_unlock(&g_backend_lock);
        if (cap > 0) snprintf(err, (size_t)cap, "%s", why ? why : "dlopen failed");
        return -1;
    }
    size_t before = ggml_backend_dev_count();
    g_last_error[0] = 0;
    ggml_backend_reg_t reg = ggml_backend_load(path);
    dlclose(h); // ggml holds its own handle for as long as the backend is registered
    if (!reg) {
        pthread_mutex_unlock(&g_backend_lock);
        if (cap > 0) snprintf(err, (size_t)cap, "%s", g_last_error[0] ? g_last_error : "ggml could not initialise the backend");
        return -1;
    }
    int32_t n = (int32_t)(ggml_backend_dev_count() - before);
    snprintf(g_backend_paths[g_backend_count], sizeof g_backend_paths[0], "%s", path);
    g_backend_devices[g_backend_count++] = n;
    pthread_mutex_unlock(&g_backend_lock);
    return n;
#else
    (void)path;
    if (cap > 0) snprintf(err, (size_t)cap, "loading backends is not supported on this platform");
    return -1;
#endif
}

/** Number of devices in ggml's registry (CPU included). */
int32_t mesh_device_count(void) { return (int32_t)ggml_backend_dev_count(); }

/**
 * Device i: name and description ("name\tdescription\tbackend" in buf), and as
 * int64s in out: type (0 CPU, 1 GPU, 2 integrated GPU, 3 accelerator), free
 * bytes, total bytes. Returns the text's length, or -1 when i is out of range.
 */
int32_t mesh_device_info(int32_t i, char *buf, int32_t cap, int64_t *out) {
    if (i < 0 || (size_t)i >= ggml_backend_dev_count()) return -1;
    ggml_backend_dev_t dev = ggml_backend_dev_get((size_t)i);
    struct ggml_backend_dev_props props;
    ggml_backend_dev_get_props(dev, &props);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    out[0] = (int64_t)props.type;
    out[1] = (int64_t)props.memory_free;
    out[2] = (int64_t)props.memory_total;
    int n = snprintf(buf, cap > 0 ? (size_t)cap : 0, "%s\t%s\t%s", props.name ? props.name : "",
                     props.description ? props.description : "", reg ? ggml_backend_reg_name(reg) : "");
    return n < 0 ? 0 : (int32_t)n;
}

static bool mesh_progress_cb(float progress, void *user) {
    if (user) *(volatile float *)user = progress;
    return true;
}

/** Load a model; progress (0..1) is written to *progress_out, which may be shared memory. */
struct llama_model *mesh_model_load(const char *path, int32_t n_gpu_layers, int32_t use_mmap, float *progress_out) {
    struct llama_model_params p = llama_model_default_params();
    p.n_gpu_layers = n_gpu_layers;
    p.load_mode = use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    p.progress_callback = mesh_progress_cb;
    p.progress_callback_user_data = progress_out;
    return llama_model_load_from_file(path, p);
}

/** Free a model returned by mesh_model_load. */
void mesh_model_free(struct llama_model *model) { llama_model_free(model); }

/** Model facts as int32s: n_vocab, bos, eos, add_bos, n_ctx_train, n_embd, n_layer, n_head, n_head_kv. */
void mesh_model_info(const struct llama_model *model, int32_t *out) {
    const struct llama_vocab *v = llama_model_get_vocab(model);
    out[0] = llama_vocab_n_tokens(v);
    out[1] = llama_vocab_bos(v);
    out[2] = llama_vocab_eos(v);
    out[3] = llama_vocab_get_add_bos(v) ? 1 : 0;
    out[4] = llama_model_n_ctx_train(model);
    out[5] = llama_model_n_embd(model);
    out[6] = llama_model_n_layer(model);
    out[7] = llama_model_n_head(model);
    out[8] = llama_model_n_head_kv(model);
}

/** Parameter count and size in bytes of the model weights. */
void mesh_model_sizes(const struct llama_model *model, uint64_t *out) {
    out[0] = llama_model_n_params(model);
    out[1] = llama_model_size(model);
}

/** A metadata value as a string; returns its length or -1 when absent. */
int32_t mesh_model_meta(const struct llama_model *model, const char *key, char *buf, int32_t cap) {
    return llama_model_meta_val_str(model, key, buf, (size_t)cap);
}

/** The model's default chat template copied into buf; -1 when it has none, else its full length. */
int32_t mesh_model_chat_template(const struct llama_model *model, char *buf, int32_t cap) {
    const char *tmpl = llama_model_chat_template(model, NULL);
    if (!tmpl) return -1;
    int32_t n = (int32_t)strlen(tmpl);
    if (cap > 0) snprintf(buf, (size_t)cap, "%s", tmpl);
    return n;
}

/** True when the token ends generation (EOS, EOT and friends). */
int32_t mesh_token_is_eog(const struct llama_model *model, int32_t token) {
    return llama_vocab_is_eog(llama_model_get_vocab(model), token) ? 1 : 0;
}

/** Tokenize text_len bytes; returns the count, or minus the needed capacity when out is too small. */
int32_t mesh_tokenize(const struct llama_model *model, const char *text, int32_t text_len, int32_t *out, int32_t cap,
                      int32_t add_special, int32_t parse_special) {
    return llama_tokenize(llama_model_get_vocab(model), text, text_len, out, cap, add_special != 0, parse_special != 0);
}

/** Bytes of one token's piece into buf; negative means buf is too small by that much. */
int32_t mesh_token_to_piece(const struct llama_model *model, int32_t token, char *buf, int32_t cap, int32_t special) {
    return llama_token_to_piece(llama_model_get_vocab(model), token, buf, cap, 0, special != 0);
}

/** Detokenize a whole sequence (drops BOS/EOS and the SPM leading space); negative = needed capacity. */
int32_t mesh_detokenize(const struct llama_model *model, const int32_t *tokens, int32_t n, char *buf, int32_t cap) {
    return llama_detokenize(llama_model_get_vocab(model), tokens, n, buf, cap, 1, 0);
}

/**
 * Where each token of a tokenized prompt ends in the prompt text, in UTF-8
 * bytes: out_ends[i] = bytes covered by tokens 0..i, pieces rendered with
 * special tokens as text. Bytes the tokenizer added count 0: a BOS it put
 * first, and the space an SPM tokenizer with add_space_prefix puts before the
 * text at the start and after each special token (in the piece, not the text).
 * One call per prompt, so prefix marks cost no FFI call per token.
 * Returns the total, or -1 when n < 0.
 */
int32_t mesh_token_byte_ends(const struct llama_model *model, const int32_t *tokens, int32_t n, int32_t *out_ends) {
    if (n < 0) return -1;
    if (n == 0) return 0;
    const struct llama_vocab *v = llama_model_get_vocab(model);
    char buf[256];
    // Whether this tokenizer prefixes text with a space is not in the public
    // API: ask it, with one letter tokenized as plain text.
    llama_token probe[8];
    bool space_prefix = false;
    if (llama_tokenize(v, "a", 1, probe, 8, false, false) > 0) {
        int32_t k = llama_token_to_piece(v, probe[0], buf, (int32_t)sizeof buf, 0, true);
        space_prefix = k >= 1 && buf[0] == ' ';
    }
    const uint32_t special = LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED | LLAMA_TOKEN_ATTR_UNKNOWN;
    int32_t total = 0;
    int32_t i = 0;
    bool fragment_start = true;
    if (llama_vocab_get_add_bos(v) && tokens[0] == llama_vocab_bos(v)) out_ends[i++] = 0;
    for (; i < n; i++) {
        int32_t len = llama_token_to_piece(v, tokens[i], buf, (int32_t)sizeof buf, 0, true);
        bool leading_space = len > 0 && buf[0] == ' ';
        if (len < 0) {
            // Longer than buf: only its first byte matters besides its length.
            char *big = (char *)malloc((size_t)-len);
            if (!big) return -1;
            len = llama_token_to_piece(v, tokens[i], big, -len, 0, true);
            leading_space = len > 0 && big[0] == ' ';
            free(big);
            if (len < 0) len = 0;
        }
        bool is_special = (llama_vocab_get_attr(v, tokens[i]) & special) != 0;
        if (space_prefix && fragment_start && !is_special && leading_space) len--;
        fragment_start = is_special;
        total += len;
        out_ends[i] = total;
    }
    return total;
}

struct mesh_ctx {
    struct llama_context *ctx;
    struct llama_batch batch;
    int32_t batch_cap;
    struct ggml_threadpool *tp;
    struct ggml_threadpool *tp_batch;
    /** Candidates of one sampling (n_vocab entries), reused across calls. */
    llama_token_data *cur;
    int32_t cur_cap;
    /** Decodes of plain_attn_min..plain_attn_max tokens use the plain attention path (max 0: never; see mesh_attn.cpp). */
    int32_t plain_attn_min;
    int32_t plain_attn_max;
    /** Whether the context was made with flash attention on (the flag mesh_decode switches back to). */
    int32_t flash;
};

int mesh_attn_flash(struct llama_context *ctx);
int mesh_attn_set_flash(struct llama_context *ctx, int on);
int mesh_attn_model_fa_ok(const struct llama_model *model);
int32_t mesh_fa_pool_set(const void *pool, int32_t min_queries);
void mesh_fa_pool_clear(const void *pool);
int32_t mesh_fa_default_min_queries(void);

// Persistent CPU thread pools, as llama.cpp's own server attaches: without
// one, ggml creates and joins its worker threads for every graph, i.e. every
// decode step and every ubatch of a prefill.
static void mesh_attach_threadpools(struct mesh_ctx *m, int32_t n_threads, int32_t n_threads_batch) {
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    struct ggml_threadpool_params tpp_batch = ggml_threadpool_params_default(n_threads_batch);
    if (!ggml_threadpool_params_match(&tpp, &tpp_batch)) {
        m->tp_batch = ggml_threadpool_new(&tpp_batch);
        if (!m->tp_batch) return;
        // Only one pool runs at a time: start the other paused.
        tpp.paused = true;
    }
    m->tp = ggml_threadpool_new(&tpp);
    if (!m->tp) {
        if (m->tp_batch) ggml_threadpool_free(m->tp_batch);
        m->tp_batch = NULL;
        return;
    }
    llama_attach_threadpool(m->ctx, m->tp, m->tp_batch);
}

static bool mesh_abort_cb(void *data) { return data != NULL && *(volatile int32_t *)data != 0; }

/**
 * Create a context. params: n_ctx, n_batch, n_ubatch, n_seq_max, n_threads, n_threads_batch,
 * kv_unified, flash_attn (-1 auto, 0 off, 1 on), offload_kqv. abort_flag (may be NULL) aborts a decode in flight.
 */
struct mesh_ctx *mesh_context_new(struct llama_model *model, const int32_t *params, int32_t *abort_flag) {
    struct llama_context_params p = llama_context_default_params();
    p.n_ctx = (uint32_t)params[0];
    p.n_batch = (uint32_t)params[1];
    p.n_ubatch = (uint32_t)params[2];
    p.n_seq_max = (uint32_t)params[3];
    p.n_threads = params[4];
    p.n_threads_batch = params[5];
    p.kv_unified = params[6] != 0;
    p.flash_attn_type = (enum llama_flash_attn_type)params[7];
    p.offload_kqv = params[8] != 0;
    p.no_perf = true;
    p.abort_callback = mesh_abort_cb;
    p.abort_callback_data = abort_flag;
    struct llama_context *ctx = llama_init_from_model(model, p);
    if (!ctx) return NULL;
    struct mesh_ctx *m = (struct mesh_ctx *)calloc(1, sizeof *m);
    if (!m) {
        llama_free(ctx);
        return NULL;
    }
    m->ctx = ctx;
    m->batch_cap = (int32_t)p.n_batch;
    m->batch = llama_batch_init(m->batch_cap, 0, 1);
    mesh_attach_threadpools(m, p.n_threads, p.n_threads_batch);
    m->flash = mesh_attn_flash(ctx);
    return m;
}

/**
 * Let decodes of min_tokens..max_tokens tokens use the plain attention path on
 * a flash-attention context (max_tokens 0 turns it off). Returns 1 when the
 * window applies, 0 when the context does not use flash attention (or max 0).
 */
int32_t mesh_set_plain_attn(struct mesh_ctx *m, int32_t min_tokens, int32_t max_tokens) {
    const int on = m->flash && max_tokens > 0 && min_tokens <= max_tokens;
    m->plain_attn_min = on ? (min_tokens < 1 ? 1 : min_tokens) : 0;
    m->plain_attn_max = on ? max_tokens : 0;
    if (m->flash) mesh_attn_set_flash(m->ctx, 1);
    return on;
}

/** Copy the logits of batch index i (up to cap floats); returns the vocabulary size, or -1 when there are none. */
int32_t mesh_logits_get(struct mesh_ctx *m, int32_t i, float *dst, int32_t cap) {
    const float *l = llama_get_logits_ith(m->ctx, i);
    if (!l) return -1;
    const int32_t n = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(m->ctx)));
    if (cap > 0) memcpy(dst, l, sizeof(float) * (size_t)(n < cap ? n : cap));
    return n;
}

/**
 * Let mesh's flash-attention kernel (mesh_fa.cpp) take this context's ubatches of min_queries or
 * more queries (0: ggml's kernel for every op). Only between this context's decodes. Returns the
 * setting in effect: -1 where the kernel is not built; 0 where it does not compute this model's
 * attention (see mesh_attn_model_fa_ok; check_model 0 skips that check, for tests of the kernel's
 * own per-op checks); the default where the shim keeps no setting for the context's pools (none
 * attached, or the table full).
 */
int32_t mesh_set_attn_kernel(struct mesh_ctx *m, int32_t min_queries, int32_t check_model) {
    if (mesh_fa_default_min_queries() == 0) return -1;  // the kernel is not built (no --wrap)
    const int model_ok = !check_model || mesh_attn_model_fa_ok(llama_get_model(m->ctx));
    if (min_queries > 0 && !model_ok) min_queries = 0;
    int32_t r = m->tp ? mesh_fa_pool_set(m->tp, min_queries) : -2;
    if (r != -2 && m->tp_batch) r = mesh_fa_pool_set(m->tp_batch, min_queries);
    if (r == -2) {
        // Both pools or neither: a pool without an entry runs the default.
        mesh_fa_pool_clear(m->tp);
        mesh_fa_pool_clear(m->tp_batch);
        r = mesh_fa_default_min_queries();
    }
    return model_ok ? r : 0;
}

/** 1 when the context's next graph uses flash attention, 0 when the plain path (tests watch the switch). */
int32_t mesh_attn_is_flash(struct mesh_ctx *m) { return mesh_attn_flash(m->ctx); }

/** Free a context and its batch. */
void mesh_context_free(struct mesh_ctx *m) {
    if (!m) return;
    llama_batch_free(m->batch);
    free(m->cur);
    llama_free(m->ctx);
    // The kernel's per-pool setting goes first: a later pool may get the same address.
    mesh_fa_pool_clear(m->tp);
    mesh_fa_pool_clear(m->tp_batch);
    if (m->tp) ggml_threadpool_free(m->tp);
    if (m->tp_batch) ggml_threadpool_free(m->tp_batch);
    free(m);
}

/** Actual context facts: n_ctx, n_ctx_seq, n_seq_max, n_batch. */
void mesh_context_info(const struct mesh_ctx *m, int32_t *out) {
    out[0] = (int32_t)llama_n_ctx(m->ctx);
    out[1] = (int32_t)llama_n_ctx_seq(m->ctx);
    out[2] = (int32_t)llama_n_seq_max(m->ctx);
    out[3] = (int32_t)llama_n_batch(m->ctx);
}

/**
 * Fill the batch with n tokens (one sequence each) and decode once.
 * Returns llama_decode's code: 0 ok, 1 no KV slot, 2 aborted, <0 error; -100 when n exceeds the batch.
 */
int32_t mesh_decode(struct mesh_ctx *m, const int32_t *tokens, const int32_t *pos, const int32_t *seq,
                    const int8_t *logits, int32_t n) {
    if (n <= 0 || n > m->batch_cap) return -100;
    struct llama_batch *b = &m->batch;
    for (int32_t i = 0; i < n; i++) {
        b->token[i] = tokens[i];
        b->pos[i] = pos[i];
        b->n_seq_id[i] = 1;
        b->seq_id[i][0] = seq[i];
        b->logits[i] = logits[i];
    }
    b->n_tokens = n;
    if (m->plain_attn_max > 0) mesh_attn_set_flash(m->ctx, n < m->plain_attn_min || n > m->plain_attn_max);
    return llama_decode(m->ctx, *b);
}

/** Remove positions [p0, p1) of a sequence from the KV memory (-1 = open end). */
int32_t mesh_seq_rm(struct mesh_ctx *m, int32_t seq, int32_t p0, int32_t p1) {
    return llama_memory_seq_rm(llama_get_memory(m->ctx), seq, p0, p1) ? 1 : 0;
}

/** Share positions [p0, p1) of src with dst (no copy in a unified KV pool). */
void mesh_seq_cp(struct mesh_ctx *m, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    llama_memory_seq_cp(llama_get_memory(m->ctx), src, dst, p0, p1);
}

/** Largest position held for a sequence, -1 when empty. */
int32_t mesh_seq_pos_max(struct mesh_ctx *m, int32_t seq) {
    return llama_memory_seq_pos_max(llama_get_memory(m->ctx), seq);
}

/** Drop every sequence's KV; with data = 0 only the bookkeeping (cells, and the placement head back to cell 0). */
void mesh_memory_clear(struct mesh_ctx *m, int32_t data) { llama_memory_clear(llama_get_memory(m->ctx), data != 0); }

/** Size in bytes of one sequence's saved state. */
uint64_t mesh_state_seq_size(struct mesh_ctx *m, int32_t seq) {
    return (uint64_t)llama_state_seq_get_size(m->ctx, seq);
}

/** Save one sequence's state into dst; returns bytes written (0 on failure). */
uint64_t mesh_state_seq_get(struct mesh_ctx *m, uint8_t *dst, uint64_t size, int32_t seq) {
    return (uint64_t)llama_state_seq_get_data(m->ctx, dst, (size_t)size, seq);
}

// Host buffers for saved sequences. Fresh anonymous memory is faulted in page
// by page on first write, and in a VM that costs ~3 us per 4 KiB page: 50 ms
// to save a 16 MiB state, most of a save. On Linux, transparent huge pages cut
// that to a few ms (the region is aligned so whole 2 MiB pages fit).
#define MESH_HUGE (2u << 20)

/** Allocate `size` bytes for a saved state; NULL when out of memory. Free with mesh_host_free(p, size). */
void *mesh_host_alloc(uint64_t size) {
    if (size == 0) return NULL;
#if defined(__linux__)
    // Map with room to align, then unmap the slack on both sides: the mapping
    // is exactly the block (rounded to 4 KiB), so with THP set to "always" no
    // huge page backs bytes the cache does not count.
    const size_t page = 4096;
    size_t body = ((size_t)size + page - 1) / page * page;
    size_t len = body + MESH_HUGE;
    uint8_t *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *aligned = (uint8_t *)(((uintptr_t)raw + MESH_HUGE - 1) / MESH_HUGE * MESH_HUGE);
    if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
    uint8_t *end = aligned + body;
    if (raw + len > end) munmap(end, (size_t)(raw + len - end));
#ifdef MADV_HUGEPAGE
    // Whole huge pages only: a partly used one would hold 2 MiB of RAM for a small tail.
    size_t huge = (size_t)size / MESH_HUGE * MESH_HUGE;
    if (huge > 0) madvise(aligned, huge, MADV_HUGEPAGE);
#endif
    return aligned;
#else
    return malloc((size_t)size);
#endif
}

/** Free a buffer from mesh_host_alloc, given the size it was allocated with. */
void mesh_host_free(void *p, uint64_t size) {
    if (!p) return;
#if defined(__linux__)
    const size_t page = 4096;
    munmap(p, ((size_t)size + page - 1) / page * page);
#else
    (void)size;
    free(p);
#endif
}

/**
 * Save one sequence's state into a new host buffer; returns it, or NULL.
 * out[0] = bytes written (what a restore reads), out[1] = bytes allocated
 * (what mesh_host_free must be given).
 */
void *mesh_state_seq_save(struct mesh_ctx *m, int32_t seq, uint64_t *out) {
    out[0] = out[1] = 0;
    size_t size = llama_state_seq_get_size(m->ctx, seq);
    if (size == 0) return NULL;
    uint8_t *buf = mesh_host_alloc(size);
    if (!buf) return NULL;
    size_t got = llama_state_seq_get_data(m->ctx, buf, size, seq);
    if (got == 0) {
        mesh_host_free(buf, size);
        return NULL;
    }
    out[0] = (uint64_t)got;
    out[1] = (uint64_t)size;
    return buf;
}

/** Restore a saved state into seq; returns bytes read (0 on failure). */
uint64_t mesh_state_seq_set(struct mesh_ctx *m, const uint8_t *src, uint64_t size, int32_t seq) {
    return (uint64_t)llama_state_seq_set_data(m->ctx, src, (size_t)size, seq);
}

static bool mesh_is_grammar(const struct llama_sampler *s) {
    const char *name = s ? llama_sampler_name(s) : NULL;
    return name != NULL && strcmp(name, "grammar") == 0;
}

/**
 * Build a sampler chain. f: temperature, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty.
 * i: top_k, penalty_last_n, seed (as uint32 bits). Temperature <= 0 means greedy.
 * grammar (NULL or "" for none): GBNF with a `root` rule; it runs first, so every later sampler
 * only sees tokens the grammar allows. NULL when the grammar does not parse (the reason is the
 * thread's last error line).
 */
struct llama_sampler *mesh_sampler_new(const struct llama_model *model, const float *f, const int32_t *i, const char *grammar) {
    struct llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    struct llama_sampler *chain = llama_sampler_chain_init(cp);
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    const float temp = f[0], top_p = f[1], min_p = f[2], rep = f[3], freq = f[4], pres = f[5];
    const int32_t top_k = i[0], last_n = i[1];
    const uint32_t seed = (uint32_t)i[2];
    if (grammar && grammar[0]) {
        struct llama_sampler *g = llama_sampler_init_grammar(vocab, grammar, "root");
        if (!g) {
            llama_sampler_free(chain);
            return NULL;
        }
        llama_sampler_chain_add(chain, g);
    }
    if (last_n != 0 && (rep != 1.0f || freq != 0.0f || pres != 0.0f)) {
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, last_n, rep, freq, pres));
    }
    if (temp <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
    if (top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1));
    if (min_p > 0.0f) llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(temp));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
    return chain;
}

/** Free a sampler chain. */
void mesh_sampler_free(struct llama_sampler *s) { llama_sampler_free(s); }

/** Feed prompt tokens to a sampler's history (they count for repetition penalties); a grammar sees only generated tokens. */
void mesh_sampler_accept(struct llama_sampler *s, const int32_t *tokens, int32_t n) {
    const int32_t n_chain = llama_sampler_chain_n(s);
    for (int32_t c = 0; c < n_chain; c++) {
        struct llama_sampler *one = llama_sampler_chain_get(s, c);
        if (mesh_is_grammar(one)) continue;
        for (int32_t k = 0; k < n; k++) llama_sampler_accept(one, tokens[k]);
    }
}

/** Most alternatives mesh_sample_many reports per token. */
#define MESH_TOP_MAX 20

/**
 * Log-probabilities over cur (tokens at -inf excluded): the log of the sum of exp(logits) into
 * *lse_out, and the n_top most probable tokens (ties: lower id first) into ids/vals, most probable
 * first, -1 ids after the last when fewer tokens are possible.
 */
static void mesh_top_logprobs(const llama_token_data_array *cur, int32_t n_top, int32_t *ids, float *vals, float *lse_out) {
    float max = -INFINITY;
    for (size_t t = 0; t < cur->size; t++) {
        if (cur->data[t].logit > max) max = cur->data[t].logit;
    }
    double sum = 0.0;
    for (size_t t = 0; t < cur->size; t++) {
        const float l = cur->data[t].logit;
        if (l != -INFINITY) sum += exp((double)(l - max));
    }
    const float lse = max == -INFINITY ? -INFINITY : max + (float)log(sum);
    *lse_out = lse;
    int32_t have = 0;
    for (size_t t = 0; t < cur->size && n_top > 0; t++) {
        const float l = cur->data[t].logit;
        if (l == -INFINITY) continue;
        const llama_token id = cur->data[t].id;
        if (have == n_top && l <= vals[have - 1]) continue;
        // Insert keeping the list sorted (strictly greater moves up, so an earlier equal stays first).
        int32_t at = have < n_top ? have : n_top - 1;
        while (at > 0 && l > vals[at - 1]) {
            vals[at] = vals[at - 1];
            ids[at] = ids[at - 1];
            at--;
        }
        vals[at] = l;
        ids[at] = id;
        if (have < n_top) have++;
    }
    for (int32_t k = 0; k < have; k++) vals[k] -= lse;
    for (int32_t k = have; k < n_top; k++) {
        ids[k] = -1;
        vals[k] = -INFINITY;
    }
}

/**
 * Run samplers [from, to) of a chain over fresh candidates from logits; the picked token, or -1.
 * Nothing is accepted (the caller decides).
 */
static llama_token mesh_pick(struct llama_sampler *chain, int32_t from, int32_t to, const float *logits, int32_t n_vocab, llama_token_data *cur) {
    for (int32_t t = 0; t < n_vocab; t++) cur[t] = (llama_token_data){t, logits[t], 0.0f};
    llama_token_data_array cur_p = {cur, (size_t)n_vocab, -1, false};
    for (int32_t c = from; c < to; c++) llama_sampler_apply(llama_sampler_chain_get(chain, c), &cur_p);
    if (cur_p.selected < 0 || (size_t)cur_p.selected >= cur_p.size) return -1;
    return cur_p.data[cur_p.selected].id;
}

/**
 * Sample n sequences in one call: samplers[k] picks from the logits at batch index idx[k]; out[k]
 * is the token, or -1 when the grammar leaves no token to pick (nothing is accepted then).
 * n_top[k] >= 0 asks for log-probabilities, written at lp_ids/lp_vals[k * (1 + MESH_TOP_MAX)]:
 * first the picked token's, then the n_top[k] (at most MESH_TOP_MAX) most probable tokens'. They
 * are log-softmax of the model's logits over the tokens the grammar allows (all tokens without a
 * grammar), before penalties, temperature and top-k/top-p/min-p.
 */
void mesh_sample_many(struct mesh_ctx *m, struct llama_sampler **samplers, const int32_t *idx, const int32_t *n_top, int32_t *out,
                      int32_t *lp_ids, float *lp_vals, int32_t n) {
    const struct llama_vocab *vocab = llama_model_get_vocab(llama_get_model(m->ctx));
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    if (m->cur_cap < n_vocab) {
        llama_token_data *grown = (llama_token_data *)realloc(m->cur, sizeof *grown * (size_t)n_vocab);
        if (!grown) {
            for (int32_t k = 0; k < n; k++) out[k] = -1;
            return;
        }
        m->cur = grown;
        m->cur_cap = n_vocab;
    }
    for (int32_t k = 0; k < n; k++) {
        struct llama_sampler *chain = samplers[k];
        const float *logits = llama_get_logits_ith(m->ctx, idx[k]);
        if (!logits) {
            out[k] = -1;
            continue;
        }
        const int32_t n_chain = llama_sampler_chain_n(chain);
        const bool grammar = n_chain > 0 && mesh_is_grammar(llama_sampler_chain_get(chain, 0));
        const int32_t want = n_top[k] > MESH_TOP_MAX ? MESH_TOP_MAX : n_top[k];
        if (grammar && want < 0) {
            // Checking every token against the grammar costs far more than a decode step of a small
            // model: first pick as if unconstrained, and check only that token. When the grammar
            // allows it, it is what picking among the allowed tokens gives (for greedy exactly; for
            // sampling, p(t) / p(allowed), up to where top-k/top-p cut); otherwise pick again below.
            llama_token picked = mesh_pick(chain, 1, n_chain, logits, n_vocab, m->cur);
            if (picked >= 0) {
                llama_token_data one = {picked, logits[picked], 0.0f};
                llama_token_data_array one_p = {&one, 1, -1, false};
                llama_sampler_apply(llama_sampler_chain_get(chain, 0), &one_p);
                if (one.logit != -INFINITY) {
                    llama_sampler_accept(chain, picked);
                    out[k] = picked;
                    continue;
                }
            }
        }
        for (int32_t t = 0; t < n_vocab; t++) m->cur[t] = (llama_token_data){t, logits[t], 0.0f};
        llama_token_data_array cur_p = {m->cur, (size_t)n_vocab, -1, false};
        int32_t c = 0;
        if (grammar) llama_sampler_apply(llama_sampler_chain_get(chain, c++), &cur_p);
        float lse = 0.0f;
        const size_t at = (size_t)k * (1 + MESH_TOP_MAX);
        if (want >= 0) mesh_top_logprobs(&cur_p, want, lp_ids + at + 1, lp_vals + at + 1, &lse);
        for (; c < n_chain; c++) llama_sampler_apply(llama_sampler_chain_get(chain, c), &cur_p);
        if (cur_p.selected < 0 || (size_t)cur_p.selected >= cur_p.size || (grammar && cur_p.data[cur_p.selected].logit == -INFINITY)) {
            // Accepting a token the grammar rejects would abort the process inside llama.cpp.
            out[k] = -1;
            continue;
        }
        const llama_token token = cur_p.data[cur_p.selected].id;
        llama_sampler_accept(chain, token);
        out[k] = token;
        if (want >= 0) {
            lp_ids[at] = token;
            lp_vals[at] = logits[token] - lse;
        }
    }
}

/** Identity of the compiled backends, e.g. "CPU : AVX2 = 1 | ..." */
const char *mesh_system_info(void) { return llama_print_system_info(); }

// ---- Split models: ggml's RPC backend (stage servers and a head's remote devices) ----

#define MESH_SPLIT_MAX 16

/**
 * Serve this process's first GPU (or, without one, the CPU) to ggml RPC clients
 * on endpoint ("127.0.0.1:port"), caching received tensors under cache_dir
 * (NULL: no cache). Blocks for as long as it serves; returns -1 only when the
 * device or the socket could not be set up. Call it from a thread of its own.
 */
int32_t mesh_rpc_serve(const char *endpoint, const char *cache_dir, int32_t n_threads) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
    if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) return -1;
    ggml_backend_rpc_start_server(endpoint, cache_dir && cache_dir[0] ? cache_dir : NULL, (size_t)(n_threads > 0 ? n_threads : 1), 1, &dev);
    return -1;
}

#if defined(__linux__) || defined(__APPLE__)
static int32_t *volatile g_stage_lost_flag = NULL;
static char g_stage_lost_msg[512];

// ggml's RPC client aborts the process when a server's connection breaks. A
// head must instead fail the requests of that one model and re-plan: record
// why, raise the engine's flag (the main thread watches it), and park the
// failing thread for good. The Worker that drove the decode is abandoned.
static void mesh_stage_abort_cb(const char *message) {
    int32_t *flag = g_stage_lost_flag;
    if (!flag) {
        fprintf(stderr, "%s\n", message ? message : "ggml abort");
        abort();
    }
    snprintf(g_stage_lost_msg, sizeof g_stage_lost_msg, "%s", message ? message : "ggml abort");
    __atomic_store_n(flag, 1, __ATOMIC_SEQ_CST);
    for (;;) pause();
}
#endif

/**
 * From now on a ggml abort (a lost RPC stage) raises *flag (shared memory the
 * engine's owner polls) and parks the aborting thread instead of ending the
 * process; NULL restores ggml's own abort. Returns 0, or -1 where that is not
 * supported.
 */
int32_t mesh_stage_abort_flag(int32_t *flag) {
#if defined(__linux__) || defined(__APPLE__)
    g_stage_lost_flag = flag;
    ggml_set_abort_callback(flag ? mesh_stage_abort_cb : NULL);
    return 0;
#else
    (void)flag;
    return -1;
#endif
}

/** Why the last stage was lost (the ggml abort message) copied into buf; returns its length. */
int32_t mesh_stage_lost_message(char *buf, int32_t cap) {
    if (cap <= 0) return 0;
#if defined(__linux__) || defined(__APPLE__)
    snprintf(buf, (size_t)cap, "%s", g_stage_lost_msg);
#else
    buf[0] = 0;
#endif
    return (int32_t)strlen(buf);
}

/**
 * Load a model split by layers: the first layers stay on this process's CPU,
 * the rest go to the RPC servers in endpoints ("host:port" separated by '\n',
 * in pipeline order), weights[i] slots each (the last slot is the output
 * layer's norm; its matrix stays here). n_gpu_layers is the sum of the weights. NULL on failure (the reason
 * in mesh_last_error).
 */
struct llama_model *mesh_model_load_split(const char *path, int32_t use_mmap, float *progress_out, const char *endpoints,
                                          const float *weights, int32_t n, int32_t n_gpu_layers) {
    if (n <= 0 || n > MESH_SPLIT_MAX || (size_t)n > llama_max_devices()) {
        snprintf(g_last_error, sizeof g_last_error, "a split takes 1 to %d stage servers", MESH_SPLIT_MAX);
        return NULL;
    }
    ggml_backend_dev_t devs[MESH_SPLIT_MAX + 1];
    float split[128];
    memset(split, 0, sizeof split);
    const char *at = endpoints;
    for (int32_t i = 0; i < n; i++) {
        char ep[256];
        const char *end = strchr(at, '\n');
        size_t len = end ? (size_t)(end - at) : strlen(at);
        if (len == 0 || len >= sizeof ep) {
            snprintf(g_last_error, sizeof g_last_error, "stage endpoint %d is empty or too long", i);
            return NULL;
        }
        memcpy(ep, at, len);
        ep[len] = 0;
        at = end ? end + 1 : at + len;
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(ep);
        if (!reg || ggml_backend_reg_dev_count(reg) == 0) {
            snprintf(g_last_error, sizeof g_last_error, "stage server %s offers no device", ep);
            return NULL;
        }
        devs[i] = ggml_backend_reg_dev_get(reg, 0);
        split[i] = weights[i];
    }
    devs[n] = NULL;
    // The output matrix stays on this node: the last stage then hands back the hidden state
    // (n_embd floats) each step instead of the logits (n_vocab floats, 32x more on a 32k vocabulary).
    struct llama_model_tensor_buft_override keep[2] = {{"^output\\.weight$", ggml_backend_cpu_buffer_type()}, {NULL, NULL}};
    struct llama_model_params p = llama_model_default_params();
    p.tensor_buft_overrides = keep;
    p.devices = devs;
    p.n_gpu_layers = n_gpu_layers;
    p.split_mode = LLAMA_SPLIT_MODE_LAYER;
    p.tensor_split = split;
    p.load_mode = use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    p.progress_callback = mesh_progress_cb;
    p.progress_callback_user_data = progress_out;
    return llama_model_load_from_file(path, p);
}
