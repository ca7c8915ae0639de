import { describe, expect, test } from "bun:test";
import { inputParamOfRelayed, RELAYED_ERROR_MAX_BYTES } from "../../../src/server/responses/relayed";

const chunked = (parts: string[]) =>
  new ReadableStream<Uint8Array>({
    start(c) {
      for (const p of parts) c.enqueue(new TextEncoder().encode(p));
      c.close();
    },
  });

describe("a peer's refusal relayed on /v1/responses", () => {
  test("a_messages_param_becomes_input_and_status_and_headers_stay", async () => {
    const body = JSON.stringify({
      error: { message: "too long", type: "invalid_request_error", param: "messages", code: "context_length_exceeded" },
    });
    const res = await inputParamOfRelayed(new Response(chunked([body]), { status: 400, headers: { "x-mesh-served-by": "bbbb" } }));
    expect(res.status).toBe(400);
    expect(res.headers.get("x-mesh-served-by")).toBe("bbbb");
    expect(((await res.json()) as { error: { param: string; code: string } }).error).toMatchObject({
      param: "input",
      code: "context_length_exceeded",
    });
  });

  test("another_param_and_a_body_that_is_not_json_go_on_unchanged", async () => {
    const other = JSON.stringify({ error: { message: "bad", param: "temperature" } });
    expect(await (await inputParamOfRelayed(new Response(other, { status: 400 }))).text()).toBe(other);
    expect(await (await inputParamOfRelayed(new Response("busy", { status: 429 }))).text()).toBe("busy");
  });

  test("a_body_past_the_read_bound_is_relayed_whole_without_being_parsed", async () => {
    const piece = "x".repeat(16 * 1024);
    const parts = Array.from({ length: Math.ceil((RELAYED_ERROR_MAX_BYTES * 2) / piece.length) }, () => piece);
    const res = await inputParamOfRelayed(new Response(chunked(parts), { status: 502 }));
    expect(res.status).toBe(502);
    expect((await res.text()).length).toBe(parts.length * piece.length);
  });
});
