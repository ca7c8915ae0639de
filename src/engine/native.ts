// dlopen of our C shim. Import this ONLY from the engine Worker: every call
// here can block for as long as a decode takes.
import { dlopen, FFIType } from "bun:ffi";

const { ptr, i32, u64, cstring, void: v } = FFIType;

const symbols = {
  mesh_shim_version: { args: [], returns: i32 },
  mesh_init: { args: [i32], returns: v },
  mesh_last_error: { args: [ptr, i32], returns: i32 },
  mesh_model_load: { args: [ptr, i32, i32, ptr], returns: ptr },
  mesh_model_free: { args: [ptr], returns: v },
  mesh_model_info: { args: [ptr, ptr], returns: v },
  mesh_model_sizes: { args: [ptr, ptr], returns: v },
  mesh_model_meta: { args: [ptr, ptr, ptr, i32], returns: i32 },
  mesh_model_chat_template: { args: [ptr, ptr, i32], returns: i32 },
  mesh_token_is_eog: { args: [ptr, i32], returns: i32 },
  mesh_tokenize: { args: [ptr, ptr, i32, ptr, i32, i32, i32], returns: i32 },
  mesh_token_to_piece: { args: [ptr, i32, ptr, i32, i32], returns: i32 },
  mesh_detokenize: { args: [ptr, ptr, i32, ptr, i32], returns: i32 },
  mesh_token_byte_ends: { args: [ptr, ptr, i32, ptr], returns: i32 },
  mesh_context_new: { args: [ptr, ptr, ptr], returns: ptr },
  mesh_context_free: { args: [ptr], returns: v },
  mesh_context_info: { args: [ptr, ptr], returns: v },
  mesh_decode: { args: [ptr, ptr, ptr, ptr, ptr, i32], returns: i32 },
  mesh_set_plain_attn: { args: [ptr, i32, i32], returns: i32 },
  mesh_attn_is_flash: { args: [ptr], returns: i32 },
  mesh_set_attn_kernel: { args: [ptr, i32, i32], returns: i32 },
  mesh_fa_counts: { args: [ptr], returns: v },
  mesh_logits_get: { args: [ptr, i32, ptr, i32], returns: i32 },
  mesh_seq_rm: { args: [ptr, i32, i32, i32], returns: i32 },
  mesh_seq_cp: { args: [ptr, i32, i32, i32, i32], returns: v },
  mesh_seq_pos_max: { args: [ptr, i32], returns: i32 },
  mesh_memory_clear: { args: [ptr, i32], returns: v },
  mesh_state_seq_size: { args: [ptr, i32], returns: u64 },
  mesh_state_seq_set: { args: [ptr, ptr, u64, i32], returns: u64 },
  mesh_state_seq_save: { args: [ptr, i32, ptr], returns: ptr },
  mesh_host_free: { args: [ptr, u64], returns: v },
  mesh_sampler_new: { args: [ptr, ptr, ptr, ptr], returns: ptr },
  mesh_sampler_free: { args: [ptr], returns: v },
  mesh_sampler_accept: { args: [ptr, ptr, i32], returns: v },
  mesh_sample_many: { args: [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32], returns: v },
  mesh_system_info: { args: [], returns: cstring },
  mesh_backend_load: { args: [ptr, ptr, i32], returns: i32 },
  mesh_device_count: { args: [], returns: i32 },
  mesh_device_info: { args: [i32, ptr, i32, ptr], returns: i32 },
  mesh_rpc_serve: { args: [ptr, ptr, i32], returns: i32 },
  mesh_stage_abort_flag: { args: [ptr], returns: i32 },
  mesh_stage_lost_message: { args: [ptr, i32], returns: i32 },
  mesh_model_load_split: { args: [ptr, i32, ptr, ptr, ptr, i32, i32], returns: ptr },
} as const;

/** The shim ABI version this TypeScript expects. */
export const SHIM_VERSION = 11;

/** The loaded shim's callable symbols. */
export type Native = ReturnType<typeof dlopen<typeof symbols>>["symbols"];

/** Open the native library at path and check its ABI version. */
export function openNative(path: string): Native {
  const lib = dlopen(path, symbols);
  const version = lib.symbols.mesh_shim_version();
  if (version !== SHIM_VERSION) {
    throw new Error(`native library ${path} has shim version ${version}, expected ${SHIM_VERSION}; rebuild with 'bun run build.ts native'`);
  }
  return lib.symbols;
}
