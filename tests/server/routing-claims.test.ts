// End to end on the real engine, through the app: after a turn, whatever the node claims its KV
// holds of the conversation (the prefixes its engine reports, through the server's marks) is
// really reused by the next turn, for templates that render growing conversations differently
// (thinking templates, a system prompt printed in the last user turn) as for plain ones.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { TenancyDelta } from "../../src/engine";
import { REPO_ROOT } from "../../src/engine/library";
import { silentLogger } from "../../src/log";
import { chatAnchors, type KeyMessage } from "../../src/routing";
import { ServedModel } from "../../src/server";
import { createApp } from "../../src/server/app";
import { ChatTemplate } from "../../src/server/chat";
import { Metrics } from "../../src/server/metrics";
import { renderChatPrompt } from "../../src/server/openai/chat";
import type { ChatBodyT } from "../../src/server/openai/schema";
import { testMeshHooks, workerRecord } from "../helpers/mesh";
import { tinyModel } from "../helpers/model";

const SELF = "a".repeat(32);
const TEMPLATES = join(REPO_ROOT, "vendor", "llama.cpp", "src", "models", "templates");
let model: ServedModel;
const held = new Set<string>();

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 8192, nParallel: 1, threads: 2, hostCacheMiB: 0 });
  await model.ready;
  model.engine?.onTenancy((d: TenancyDelta) => {
    for (const [h] of d.inserts) held.add(h);
    for (const h of d.evicts) held.delete(h);
  });
});

afterAll(() => model?.close());

describe("what a node claims is what the next turn reuses", () => {
  // What each should claim of [system, user, reply]: all of it; not the reply, which thinking templates render back
  // without the generation prompt's think tag; nothing, where the system prompt moves to the last user turn.
  for (const [file, claims] of [
    ["Qwen-Qwen2.5-7B-Instruct.jinja", 3],
    ["Qwen3.5-4B.jinja", 2],
    ["deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", 2],
    ["mistralai-Mistral-Nemo-Instruct-2407.jinja", 0],
  ] as const) {
    test(`claimed_prefix_is_really_reused_with_${file.replace(/\W+/g, "_")}`, async () => {
      const info = model.info as NonNullable<typeof model.info>;
      model.template = new ChatTemplate(readFileSync(join(TEMPLATES, file), "utf8"), { bosToken: info.bosText, eosToken: info.eosText });
      const mesh = testMeshHooks({ nodeId: SELF, workers: () => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1" })] });
      const app = createApp({ models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics(), mesh });
      const chat = async (messages: KeyMessage[]) => {
        const r = await app.handle(
          new Request("http://localhost/v1/chat/completions", {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ model: "mesh-tiny", messages, max_tokens: 12, temperature: 0, ignore_eos: true }),
          }),
        );
        expect(r.status).toBe(200);
        return (await r.json()) as {
          choices: Array<{ message: { content: string } }>;
          usage: { prompt_tokens_details: { cached_tokens: number } };
        };
      };
      const turn1: KeyMessage[] = [
        { role: "system", content: `You are a careful assistant (${file}). Answer briefly and precisely, citing sources.` },
        { role: "user", content: "Explain how a radix tree differs from a trie, with an example of each one." },
      ];
      const first = await chat(turn1);
      const turn2: KeyMessage[] = [
        ...turn1,
        { role: "assistant", content: first.choices[0]?.message.content ?? "" },
        { role: "user", content: "Now compare their memory use." },
      ];
      await Bun.sleep(100); // reply marks are attached after the answer
      const key = mesh.keyer.chat("mesh-tiny", turn2);
      let depth = 0;
      while (depth < key.length && held.has(key.hash(depth))) depth++;
      // Tokens turn 2 needs reused for the claim to be true: up to where its claimed blocks end in turn 2's prompt.
      const prompt = renderChatPrompt(model, { model: "mesh-tiny", messages: turn2 } as ChatBodyT);
      const end = depth > 0 ? (chatAnchors(key, turn2, prompt)[depth - 1]?.byteEnd ?? 0) : 0;
      const need =
        depth > 0
          ? ((await model.engine?.tokenize(Buffer.from(prompt).subarray(0, end).toString(), { addSpecial: true }))?.length ?? 0)
          : 0;
      const second = await chat(turn2);
      const cached = second.usage.prompt_tokens_details.cached_tokens;
      // A couple of tokens of slack for tokenizer boundaries.
      expect({ file, depth, cachedAtLeast: cached >= need - 2 }).toEqual({ file, depth: claims, cachedAtLeast: true });
    });
  }
});
