// An engine Worker that dies without close() (a crash, or force-terminated when stuck): every caller
// settles with an error, and the served model reports itself failed instead of taking more requests.
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { readHostLedger } from "../../src/engine/host-ledger";
import { collect, Engine, EngineError } from "../../src/engine/index";
import { ServedModel } from "../../src/server/model";
import { tinyModel } from "../helpers/model";

/** OS threads of this process: llama.cpp's thread pools are among them. */
function threads(): number {
  return readdirSync("/proc/self/task").length;
}

describe("an engine worker that dies", () => {
  test("a_force_terminated_worker_fails_its_generations_and_the_model_reports_failed", async () => {
    const model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 2048, nParallel: 2, threads: 1 });
    await model.ready;
    expect(model.status).toBe("ready");
    const engine = model.engine as NonNullable<typeof model.engine>;
    const gen = engine.generate({ prompt: "a long answer", maxTokens: 1500, sampling: { temperature: 0 }, ignoreEos: true });
    let failure: unknown = null;
    let texts = 0;
    try {
      for await (const e of gen) {
        if (e.kind === "text" && ++texts === 2) (engine as unknown as { worker: Worker }).worker.terminate();
      }
    } catch (e) {
      failure = e;
    }
    expect(failure).toBeInstanceOf(EngineError);
    expect((failure as EngineError).code).toBe("engine_closed");
    expect(model.status).toBe("failed");
    expect(model.error).toContain("engine worker stopped");
    // Later calls fail fast, and closing a dead engine does not wait for an answer that never comes.
    await expect(engine.stats()).rejects.toBeInstanceOf(EngineError);
    expect(() => engine.generate({ prompt: "x", maxTokens: 1, sampling: { temperature: 0 } })).toThrow(EngineError);
    await model.close();
  }, 120_000);

  test("a_force_terminated_worker_s_model_context_and_thread_pools_are_freed_by_a_reaper", async () => {
    const before = threads();
    const model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 2048, nParallel: 2, threads: 4 });
    await model.ready;
    const engine = model.engine as Engine;
    // Thread pools of 4 threads: 3 workers beside the caller, plus the engine Worker's own thread.
    const loaded = threads();
    expect(loaded - before).toBeGreaterThanOrEqual(3);
    (engine as unknown as { worker: Worker }).worker.terminate();
    await engine.whenReleased();
    // The pools' 3 threads are joined by the free (without it they stay for the life of the process). Bun may keep
    // a thread or two of the dead Worker's runtime around, so the count is compared with the loaded one.
    const deadline = Date.now() + 30_000;
    while (threads() > loaded - 3 && Date.now() < deadline) await Bun.sleep(50);
    expect(threads()).toBeLessThanOrEqual(loaded - 3);
    expect(model.status).toBe("failed");
  }, 120_000);

  test("a_force_terminated_worker_s_host_ram_kv_copies_are_freed_by_the_reaper", async () => {
    const engine = await Engine.load({ modelPath: await tinyModel(), threads: 1, nCtx: 2048, nParallel: 1, hostCacheMiB: 64 });
    // One slot, two conversations: the first one's KV is copied to host RAM when the second takes the slot.
    const prompt = (seed: number) => Array.from({ length: 120 }, (_, i) => 100 + ((seed * 7919 + i * 104729) % 20000));
    const greedy = { temperature: 0 };
    await collect(engine.generate({ prompt: prompt(1), maxTokens: 4, sampling: greedy, ignoreEos: true }));
    await collect(engine.generate({ prompt: prompt(2), maxTokens: 4, sampling: greedy, ignoreEos: true }));
    const deadline = Date.now() + 30_000;
    while ((await engine.stats()).hostCacheEntries < 1 && Date.now() < deadline) await Bun.sleep(20);
    const held = (await engine.stats()).hostCacheEntries;
    expect(held).toBeGreaterThanOrEqual(1);
    // The ledger the Worker keeps in shared memory names the same buffers the host tier holds, as live mappings.
    const ledger = (engine as unknown as { native: { hostLedger: SharedArrayBuffer } }).native.hostLedger;
    const { buffers } = readHostLedger(ledger);
    expect(buffers.length).toBe(held);
    const mapped = () =>
      new Set(
        readFileSync("/proc/self/maps", "utf8")
          .split("\n")
          .map((l) => l.split("-")[0]),
      );
    const hex = (p: number) => p.toString(16);
    for (const b of buffers) expect(mapped().has(hex(b.ptr))).toBe(true);
    (engine as unknown as { worker: Worker }).worker.terminate();
    await engine.whenReleased();
    // Without the ledger these mappings stayed for the life of the process (nothing else knew their addresses).
    expect(engine.reapReport()).toEqual({
      hostBuffers: held,
      hostBytes: buffers.reduce((n, b) => n + b.size, 0),
      untracked: 0,
    });
    const after = mapped();
    for (const b of buffers) expect(after.has(hex(b.ptr))).toBe(false);
  }, 120_000);
});
