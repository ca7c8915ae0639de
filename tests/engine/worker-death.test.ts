// An engine Worker that dies without close() (a crash, or force-terminated when stuck): every caller
// settles with an error, and the served model reports itself failed instead of taking more requests.
import { describe, expect, test } from "bun:test";
import { EngineError } from "../../src/engine/index";
import { ServedModel } from "../../src/server/model";
import { tinyModel } from "../helpers/model";

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
});
