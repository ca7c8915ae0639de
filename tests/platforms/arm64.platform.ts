// dist/mesh-linux-arm64, cross-built on x64, run under qemu user-mode
// emulation with Debian's arm64 C library: --version, serve on the demo
// model, one chat completion and one stream. Slow (every instruction is
// emulated), so the requests are short.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { builtFile, qemuArm64, runFile, type ServingFile, serveFile } from "./file";

const file = builtFile("mesh-linux-arm64", "--target linux-arm64");
const prefix = qemuArm64();
if (prefix === null)
  throw new Error("qemu-aarch64-static and the arm64 C library are needed: apt-get install qemu-user-static libc6-arm64-cross");
let node: ServingFile;

beforeAll(async () => {
  node = await serveFile({ file, prefix });
});

afterAll(async () => {
  await node?.stop();
});

test("the_arm64_file_is_an_aarch64_executable_and_reports_its_platform", async () => {
  const head = new Uint8Array(await Bun.file(file).slice(0, 20).arrayBuffer());
  // ELF, e_machine 183 = EM_AARCH64.
  expect(Array.from(head.subarray(0, 4))).toEqual([0x7f, 0x45, 0x4c, 0x46]);
  expect((head[18] as number) | ((head[19] as number) << 8)).toBe(183);
  const r = await runFile({ file, prefix }, ["version", "--json"]);
  expect(r.code).toBe(0);
  expect(JSON.parse(r.out)).toMatchObject({ target: "linux-arm64", backend: "cpu" });
});

test("serves_the_demo_model_under_qemu_one_completion_and_one_stream", async () => {
  expect(node.log()).toMatch(/device name=CPU .*type=cpu/);
  const r = await node.client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 4 });
  expect(r.usage?.completion_tokens).toBe(4);
  const stream = await node.client.chat.completions.create({
    model: "mesh-tiny",
    messages: [{ role: "user", content: "and again" }],
    max_tokens: 4,
    stream: true,
    stream_options: { include_usage: true },
  });
  let tokens = 0;
  for await (const c of stream) if (c.usage) tokens = c.usage.completion_tokens;
  expect(tokens).toBe(4);
});
