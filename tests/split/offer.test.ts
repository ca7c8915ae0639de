import { describe, expect, test } from "bun:test";
import { offersOf, parseOffer, serializeOffer, stageKey } from "../../src/split/offer";
import { renderSplitMetrics, type SplitReport, splitLines } from "../../src/split/report";
import { probeTunnel } from "../../src/split/tunnel";

const offer = {
  tunnel: "10.0.0.2:7000",
  budget: 1 << 30,
  device: { name: "CPU", type: "cpu", free: 2 * 2 ** 30, total: 4 * 2 ** 30 },
  inUse: false,
};

describe("stage offers", () => {
  test("round_trips_an_offer_and_refuses_one_under_another_nodes_key_or_malformed", () => {
    const v = serializeOffer(offer);
    expect(parseOffer(stageKey("aa"), "aa", v)).toEqual({ nodeId: "aa", ...offer });
    expect(parseOffer(stageKey("bb"), "aa", v)).toBeNull(); // a node writes only its own offer
    for (const bad of [
      "{",
      "[]",
      JSON.stringify({ ...offer, budget: -1 }),
      JSON.stringify({ ...offer, tunnel: "no port" }),
      JSON.stringify({ ...offer, inUse: "no" }),
    ]) {
      expect(parseOffer(stageKey("aa"), "aa", bad)).toBeNull();
    }
    const records = [
      { key: stageKey("aa"), owner: "aa", value: v },
      { key: stageKey("bb"), owner: "bb", value: null },
      { key: "worker:xyz", owner: "aa", value: "{}" },
      { key: stageKey("cc"), owner: "cc", value: "garbage" },
    ];
    expect(offersOf(records).map((o) => o.nodeId)).toEqual(["aa"]);
  });
});

describe("stage offers from a hostile peer", () => {
  test("refuses_an_offer_whose_tunnel_port_is_out_of_range_so_no_head_plan_throws", async () => {
    // A peer's offer naming port 99999 passed the check, and net.connect throws on it: the head's
    // planning threw, so its split model failed to load, or never re-planned after a stage loss.
    for (const tunnel of ["10.0.0.2:99999", "10.0.0.2:65536", "10.0.0.2:0"]) {
      expect(parseOffer(stageKey("aa"), "aa", serializeOffer({ ...offer, tunnel }))).toBeNull();
    }
    expect(parseOffer(stageKey("aa"), "aa", serializeOffer({ ...offer, tunnel: "[::1]:65535" }))?.tunnel).toBe("[::1]:65535");
    // And the probe itself answers with a value, never a throw, whatever the address.
    expect(await probeTunnel("127.0.0.1", 99999, "secret", 1_000)).toMatchObject({ code: "stage_unreachable" });
    expect(await probeTunnel("127.0.0.1", Number.NaN, "secret", 1_000)).toMatchObject({ code: "stage_unreachable" });
  });
});

describe("split report", () => {
  const r: SplitReport = {
    model: "big",
    state: "split",
    stages: [
      { node_id: "head0000aaaa", role: "head", first_layer: 0, layers: 4, bytes: 40 << 20, rtt_ms: null },
      { node_id: "stage111bbbb", role: "stage", first_layer: 4, layers: 5, bytes: 50 << 20, rtt_ms: 0.4 },
    ],
    refused: [],
    stages_lost: 1,
    replans: 1,
  };

  test("renders_layers_bytes_and_losses_per_node_as_metrics", () => {
    const text = renderSplitMetrics([r]);
    expect(text).toContain('mesh_split_stage_layers{model="big",node="stage111bbbb",role="stage"} 5');
    expect(text).toContain('mesh_split_stage_bytes{model="big",node="head0000aaaa",role="head"} 41943040');
    expect(text).toContain('mesh_split_serving{model="big"} 1');
    expect(text).toContain('mesh_split_stages_lost_total{model="big"} 1');
    expect(text.endsWith("\n")).toBe(true);
    expect(renderSplitMetrics([])).toBe("");
  });

  test("prints_offers_and_the_split_under_the_peers_table", () => {
    const lines = splitLines([{ node_id: "stage111bbbb", tunnel: "x:1", budget: 512 << 20, device: "CPU", in_use: true }], [r]);
    expect(lines).toContain("stage offers: stage111 512 MiB CPU (in use)");
    expect(lines.at(-1)).toBe("split big [split]: head0000 layers 0-3 (40 MiB) -> stage111 layers 4-8 (50 MiB); stages lost 1, re-plans 1");
    expect(splitLines(undefined, undefined)).toEqual([]);
  });
});
