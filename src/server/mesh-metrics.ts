// Prometheus text for the mesh: members by state, what was refused and why
// (forged or unsigned records, watermarks, senders), membership events,
// workers by origin, and forwarding. Label values are fixed sets.
import type { MeshStats } from "../mesh/node";
import type { ForwardStats } from "./forward";
import type { RoutingReport } from "./mesh-routes";
import { family } from "./metrics";

/** What /metrics shows about the mesh. */
export interface MeshFigures {
  mesh: MeshStats;
  forwarding: ForwardStats;
  routing?: RoutingReport;
}

/** Prometheus label value: backslash, quote and newline escaped. */
function label(v: string): string {
  return v.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/** The routing series: decisions, the index per model, the sync's traffic and what it could not resolve. */
function renderRouting(r: RoutingReport): string {
  const d = r.decisions;
  const s = r.sync;
  const out = [
    family(
      "mesh_routing_decisions_total",
      "counter",
      "Requests routed, by what decided (cache, load, only candidate; local: no choice made)",
      [
        ['{by="cache"}', d.byReason.cache],
        ['{by="load"}', d.byReason.load],
        ['{by="only"}', d.byReason.only],
        ['{by="local"}', d.byReason.local],
      ],
    ),
    family("mesh_routing_targets_total", "counter", "Requests routed, by where they ran", [
      ['{target="self"}', d.toSelf],
      ['{target="peer"}', d.toPeer],
    ]),
    family(
      "mesh_routing_lease_routes_total",
      "counter",
      "Cache routes whose holder was known only from a lease (its engine had not reported yet)",
      [["", d.viaLease]],
    ),
    family(
      "mesh_routing_index_entries",
      "gauge",
      "Prefix hashes in the routing index, per model",
      r.index.map((m) => [`{model="${label(m.model)}"}`, m.entries] as [string, number]),
    ),
    family(
      "mesh_routing_index_bytes",
      "gauge",
      "Estimated bytes of the routing index, per model",
      r.index.map((m) => [`{model="${label(m.model)}"}`, m.bytes] as [string, number]),
    ),
  ];
  if (s) {
    out.push(
      family("mesh_routing_sync_bytes_last_round", "gauge", "Bytes the index sync sent in its last round", [["", s.bytesLastRound]]),
      family("mesh_routing_sync_bytes_total", "counter", "Bytes the index sync sent", [["", s.bytesSent]]),
      family("mesh_routing_sync_ops_total", "counter", "Prefix inserts and evictions sent to and applied from peers", [
        ['{op="insert",dir="sent"}', s.insertsSent],
        ['{op="evict",dir="sent"}', s.evictsSent],
        ['{op="insert",dir="applied"}', s.insertsApplied],
        ['{op="evict",dir="applied"}', s.evictsApplied],
      ]),
      family("mesh_routing_unresolved_hashes", "gauge", "Parents of received prefixes this node does not hold yet (asked for, or queued)", [
        ["", s.unresolved],
      ]),
      family(
        "mesh_routing_sync_refused_total",
        "counter",
        "Index sync messages refused, by reason",
        Object.entries(s.refused).map(([k, v]) => [`{reason="${k}"}`, v] as [string, number]),
      ),
    );
  }
  return out.join("\n");
}

/** Render the mesh's series (no trailing newline). */
export function renderMeshMetrics(f: MeshFigures): string {
  const { members, membership: m, kv, sync, workers: w } = f.mesh;
  return [
    family("mesh_members", "gauge", "Other members by SWIM state", [
      ['{state="alive"}', members.alive],
      ['{state="suspect"}', members.suspect],
      ['{state="dead"}', members.dead],
      ['{state="left"}', members.left],
    ]),
    family(
      "mesh_membership_events_total",
      "counter",
      "Probes, suspicions, deaths, refutations, self-resets (this node declared dead) and members kept dead until they reset",
      [
        ['{event="probe"}', m.probes],
        ['{event="suspicion"}', m.suspicions],
        ['{event="death"}', m.deaths],
        ['{event="refutation"}', m.refutations],
        ['{event="self_reset"}', m.selfResets],
        ['{event="unreset_return"}', m.unresetReturns],
      ],
    ),
    family("mesh_membership_records_rejected_total", "counter", "Membership records refused, by reason", [
      ['{reason="forged"}', m.forgedRecords],
      ['{reason="unsigned"}', m.unsignedRecords],
      ['{reason="malformed"}', m.malformedRecords],
    ]),
    family("mesh_kv_records_rejected_total", "counter", "Replicated records and claims refused, by reason", [
      ['{reason="forged"}', kv.rejectedForged],
      ['{reason="unsigned_watermark"}', kv.rejectedUnsignedWatermarks],
      ['{reason="malformed"}', kv.rejectedMalformed],
      ['{reason="unknown_owner"}', kv.rejectedUnknownOwner],
      ['{reason="owner_down"}', kv.rejectedOwnerDown],
      ['{reason="full"}', kv.rejectedFull],
      ['{reason="clock_skew"}', kv.rejectedClockSkew],
    ]),
    family(
      "mesh_sync_rejected_sender_total",
      "counter",
      "Sync messages refused because they named another sender than the authenticated one",
      [["", sync.rejectedSender]],
    ),
    family("mesh_kv_entries", "gauge", "Replicated keys held, live and tombstoned", [
      ['{kind="record"}', kv.records],
      ['{kind="tombstone"}', kv.tombstones],
    ]),
    family("mesh_workers", "gauge", "Workers known to this node, by origin", [
      ['{origin="local"}', w.local],
      ['{origin="mesh"}', w.mesh],
    ]),
    family(
      "mesh_forwarded_requests_total",
      "counter",
      "Requests sent to a peer serving the model: forwarded, retried on another peer, failed, run here instead (the peers failed or refused, and this node serves the model); peer answers refused for lacking a valid mesh proof",
      [
        ['{result="forwarded"}', f.forwarding.forwarded],
        ['{result="retried"}', f.forwarding.retried],
        ['{result="failed"}', f.forwarding.failed],
        ['{result="unproven"}', f.forwarding.unproven ?? 0],
        ['{result="ran_here"}', f.forwarding.ranHere ?? 0],
      ],
    ),
    family("mesh_forwarded_requests_active", "gauge", "Forwarded requests in flight", [["", f.forwarding.active]]),
    ...(f.routing ? [renderRouting(f.routing)] : []),
  ].join("\n");
}
