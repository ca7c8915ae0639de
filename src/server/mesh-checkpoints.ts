// GET /mesh/checkpoints/{model}/{key}: a session checkpoint of a model served
// here, as a blob a peer imports (hydration). Mesh members only: the app's
// gate verified the caller before this runs; anyone else gets the mesh 401 and
// learns nothing (not even whether the checkpoint exists). Bounded: a blob
// over MAX_CHECKPOINT_BLOB is never sent.
import { Elysia } from "elysia";
import { errorBody } from "./errors";
import { type MeshGate, meshUnauthorized } from "./mesh-gate";
import type { ServedModel } from "./model";

/** Largest checkpoint blob served (a peer reads at most what the holder announced). */
export const MAX_CHECKPOINT_BLOB = 1024 * 1024 * 1024;

const KEY = /^[A-Za-z0-9_-]{1,128}$/;

function jsonError(status: number, message: string, code: string): Response {
  const type = status === 401 ? "authentication_error" : "invalid_request_error";
  return new Response(JSON.stringify({ error: { message, type, param: null, code } }), {
    status,
    headers: { "content-type": "application/json" },
  });
}

/** The checkpoint route as an Elysia plugin (mounted with the mesh routes). */
export function meshCheckpointRoutes(o: { gate: MeshGate; models: readonly ServedModel[] }) {
  return new Elysia({ name: "mesh-checkpoints" }).get("/mesh/checkpoints/:model/:key", async ({ request, params }) => {
    if (!o.gate.caller(request)) {
      const e = meshUnauthorized();
      return new Response(JSON.stringify(errorBody(e)), { status: e.status, headers: { "content-type": "application/json" } });
    }
    // The router has decoded the id once already (as the fetcher encoded it once): decoding again threw on a `%`.
    const model = o.models.find((m) => m.id === params.model);
    if (!model?.engine?.exportCheckpoint) return jsonError(404, "no such model here", "model_not_found");
    if (!KEY.test(params.key)) return jsonError(400, "a checkpoint key is 1 to 128 of [A-Za-z0-9_-]", "invalid_key");
    const blob = await model.engine.exportCheckpoint(params.key).catch(() => null);
    if (!blob) return jsonError(404, "no such checkpoint here", "checkpoint_not_found");
    if (blob.byteLength > MAX_CHECKPOINT_BLOB) return jsonError(413, "checkpoint too large to send", "checkpoint_too_large");
    return new Response(blob, { headers: { "content-type": "application/octet-stream", "content-length": String(blob.byteLength) } });
  });
}
