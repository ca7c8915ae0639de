// Devices in worker records: carried through the canonical form, bounded, and
// a record with malformed devices is refused like any other bad record.
import { expect, test } from "bun:test";
import type { WorkerDevice, WorkerInfo } from "../../src/mesh/wire";
import { checkSpec, MAX_DEVICES, parseWorker, serializeWorker, workerIdOf } from "../../src/mesh/worker-info";

const owner = "0123456789abcdef0123456789abcdef";
const vk: WorkerDevice = { name: "Vulkan0", backend: "Vulkan", type: "gpu", free: 2 ** 31, total: 2 ** 31 };

function worker(devices?: unknown): WorkerInfo {
  const base = {
    id: workerIdOf(owner, "m", "h:1"),
    nodeId: owner,
    addr: "h:1",
    models: ["m"],
    ctxSize: 4096,
    slotsTotal: 4,
    slotsBusy: 0,
    kvUsed: 0,
    kvCached: 0,
    kvTotal: 4096,
    queueDepth: 0,
    health: "ready" as const,
  };
  return (devices === undefined ? base : { ...base, devices }) as WorkerInfo;
}

test("devices_travel_in_the_worker_record_and_a_record_without_them_still_parses", () => {
  const w = worker([vk]);
  const back = parseWorker(serializeWorker(w), owner, w.id);
  expect(back?.devices).toEqual([vk]);
  const old = worker();
  const parsed = parseWorker(serializeWorker(old), owner, old.id);
  expect(parsed).not.toBeNull();
  expect(parsed?.devices).toBeUndefined();
});

test("a_record_with_more_devices_than_the_bound_is_refused", () => {
  const many = Array.from({ length: MAX_DEVICES + 1 }, (_, i) => ({ ...vk, name: `Vulkan${i}` }));
  expect(checkSpec(worker(many))).toContain(`at most ${MAX_DEVICES}`);
  expect(parseWorker(JSON.stringify(worker(many)), owner, worker().id)).toBeNull();
  expect(checkSpec(worker(many.slice(0, MAX_DEVICES)))).toBeNull();
});

test("malformed_devices_are_refused_with_a_reason", () => {
  expect(checkSpec(worker([{ ...vk, name: "" }]))).toContain("name");
  expect(checkSpec(worker([{ ...vk, name: "x".repeat(65) }]))).toContain("name");
  expect(checkSpec(worker([{ ...vk, type: "tpu" }]))).toContain("type");
  expect(checkSpec(worker([{ ...vk, free: -1 }]))).toContain("memory");
  expect(checkSpec(worker("Vulkan0"))).toContain("devices");
});
