// Per-decode choice of the attention kernel on CPU.
//
// With flash attention on, ggml's CPU kernel for a ubatch of fewer than
// GGML_FA_TILE_Q (64) queries walks the cache one key at a time per query row
// (scalar exp, F16 accumulation): for a short suffix over a long cached prefix
// (an agent's next turn) that is two thirds of the step. The plain path
// (KQ = K*Q as one GEMM, a vectorised softmax, V*KQ) does the same work as two
// matrix products. llama.cpp fixes the choice for a context's life; the KV
// layout does not depend on it once the context exists (flash on stores V
// untransposed and the plain path copies it transposed per step), so the shim
// flips the context's flag between decodes and drops the cached graph so the
// next ubatch is built for the new choice.
//
// What else reads the flag after the context exists: the graph builders (per
// graph, hence the reset) and the worst-case reserves (sched_reserve, and
// memory_update after a position shift). mesh never shifts positions and
// never changes adapters or causality, so those reserves do not run after the
// context is made; were one to run while the flag says plain, it would size
// the compute buffer for a 512-token plain step.
//
// The flag and the cached graph are private members of llama_context: the
// explicit instantiation below is the standard-sanctioned way to name a
// private member (access checks do not apply to explicit instantiations).
// This file is built only against the pinned llama.cpp source.
#include "llama-context.h"
#include "llama-model.h"

namespace {

template <typename Tag, typename Tag::type M>
struct mesh_member {
    friend typename Tag::type mesh_get(Tag) { return M; }
};

struct mesh_cparams_tag {
    using type = llama_cparams llama_context::*;
    friend type mesh_get(mesh_cparams_tag);
};
template struct mesh_member<mesh_cparams_tag, &llama_context::cparams>;

struct mesh_prev_graph_tag {
    using type = llm_graph_result * llama_context::*;
    friend type mesh_get(mesh_prev_graph_tag);
};
template struct mesh_member<mesh_prev_graph_tag, &llama_context::gf_res_prev_active>;

}  // namespace

extern "C" {

/** Whether the context builds its attention with flash attention now (after "auto" was resolved). */
int mesh_attn_flash(struct llama_context *ctx) {
    return (ctx->*mesh_get(mesh_cparams_tag{})).flash_attn ? 1 : 0;
}

/** Switch flash attention for the next decodes; returns 1 when it changed. */
int mesh_attn_set_flash(struct llama_context *ctx, int on) {
    llama_cparams &cp = ctx->*mesh_get(mesh_cparams_tag{});
    const bool want = on != 0;
    if (cp.flash_attn == want) return 0;
    cp.flash_attn = want;
    // A graph kept for reuse was built for the other kernel: never reuse it.
    ctx->*mesh_get(mesh_prev_graph_tag{}) = nullptr;
    return 1;
}

int32_t mesh_fa_shape_ok(int64_t dk, int64_t dv, int64_t group);

/**
 * Whether mesh's flash-attention kernel (mesh_fa.cpp) computes this model's attention: head
 * sizes and grouping it takes in every attention layer, and none of what it hands to ggml's
 * kernel (ALiBi, soft-capped scores, attention sinks). Layers without attention are skipped.
 */
int mesh_attn_model_fa_ok(const struct llama_model *model) {
    const llama_hparams &hp = model->hparams;
    if (hp.use_alibi || hp.f_max_alibi_bias != 0.0f || hp.attn_soft_cap) return 0;
    bool any = false;
    for (uint32_t il = 0; il < hp.n_layer_all; il++) {
        const uint32_t nkv = hp.n_head_kv(il);
        if (nkv == 0) continue;
        const uint32_t nh = hp.n_head(il);
        if (nh % nkv != 0 || !mesh_fa_shape_ok(hp.n_embd_head_k(il), hp.n_embd_head_v(il), nh / nkv)) return 0;
        if (il < model->layers.size() && model->layers[il].attn_sinks) return 0;
        any = true;
    }
    return any ? 1 : 0;
}

}
