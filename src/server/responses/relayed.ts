// A peer's refusal relayed on /v1/responses: the peer ran the equivalent chat request, so its errors name
// `messages` where this client sent `input`.
/** Largest relayed error body read to rename its param; a longer one is relayed as it came. */
export const RELAYED_ERROR_MAX_BYTES = 64 * 1024;

/** A peer's refusal of the chat request a Responses request ran as: its `messages` param is this client's `input`. */
export async function inputParamOfRelayed(res: Response): Promise<Response> {
  const headers = new Headers(res.headers);
  headers.delete("content-length");
  if (!res.body) return res;
  // Read at most the cap; a longer body (never an error of ours) goes on as it came, read part first.
  const reader = res.body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    size += value.byteLength;
    if (size > RELAYED_ERROR_MAX_BYTES) {
      const rest = new ReadableStream<Uint8Array>({
        start: (c) => {
          for (const p of parts) c.enqueue(p);
        },
        pull: async (c) => {
          const next = await reader.read();
          if (next.done) c.close();
          else c.enqueue(next.value);
        },
        cancel: (why) => reader.cancel(why),
      });
      return new Response(rest, { status: res.status, headers });
    }
  }
  const text = Buffer.concat(parts).toString("utf8");
  try {
    const body = JSON.parse(text) as { error?: { param?: unknown } };
    if (body.error?.param === "messages")
      return Response.json({ ...body, error: { ...body.error, param: "input" } }, { status: res.status, headers });
  } catch {
    // not JSON: relayed as it came
  }
  return new Response(text, { status: res.status, headers });
}
