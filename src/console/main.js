// The mesh console, in the browser. Everything comes from the node that served
// this page: /api/events (server-sent events, read with fetch so an API key can
// be sent), /api/requests, /api/cache, /v1/models and /v1/chat/completions.
// Preact + htm (no build-time JSX) for the views, uPlot for the time series.
import htm from "htm";
import { h, render } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import uPlot from "uplot";

const html = htm.bind(h);

// ---- data ---------------------------------------------------------------

const KEY = "mesh-console-key";
const MAX_REQUESTS = 500;
const MAX_POINTS = 300;

const store = {
  status: "connecting",
  needKey: false,
  self: null,
  mesh: null,
  cache: null,
  requests: [],
  // Per node: times and values of each charted figure, bounded.
  history: { t: [], nodes: {} },
  listeners: new Set(),
};

function changed() {
  for (const f of store.listeners) f();
}

function useStore() {
  const [, set] = useState(0);
  useEffect(() => {
    let queued = false;
    const f = () => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        set((x) => x + 1);
      });
    };
    store.listeners.add(f);
    // A change between this component's render and this effect (a fast 401, a first event) would be missed: render again.
    f();
    return () => store.listeners.delete(f);
  }, []);
  return store;
}

function authHeaders() {
  const k = sessionStorage.getItem(KEY);
  return k ? { authorization: `Bearer ${k}` } : {};
}

async function api(path, init = {}) {
  const r = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers ?? {}) } });
  if (r.status === 401) {
    store.needKey = true;
    changed();
    throw new Error("an API key is required");
  }
  return r;
}

function upsertRequest(r) {
  const i = store.requests.findIndex((x) => x.id === r.id);
  if (i >= 0) store.requests[i] = r;
  else {
    store.requests.unshift(r);
    if (store.requests.length > MAX_REQUESTS) store.requests.length = MAX_REQUESTS;
  }
}

function kvUse(report) {
  let used = 0;
  let total = 0;
  for (const m of report?.models ?? []) {
    if (!m.kv) continue;
    used += m.kv.total - m.kv.free;
    total += m.kv.total;
  }
  return total > 0 ? used / total : null;
}

function record(mesh) {
  const h = store.history;
  h.t.push(mesh.at / 1000);
  for (const m of mesh.members) {
    const rep = mesh.nodes[m.id];
    if (!h.nodes[m.id]) h.nodes[m.id] = { ttft: [], tps: [], hit: [], kv: [] };
    const s = h.nodes[m.id];
    // Series start where the node appeared: pad with gaps.
    while (s.ttft.length < h.t.length - 1) for (const k of ["ttft", "tps", "hit", "kv"]) s[k].push(null);
    s.ttft.push(rep?.recent.ttftMs ?? null);
    s.tps.push(rep?.recent.tokensPerS ?? null);
    s.hit.push(rep?.recent.hitRate ?? null);
    s.kv.push(kvUse(rep));
  }
  for (const s of Object.values(h.nodes)) while (s.ttft.length < h.t.length) for (const k of ["ttft", "tps", "hit", "kv"]) s[k].push(null);
  if (h.t.length > MAX_POINTS) {
    h.t.shift();
    for (const s of Object.values(h.nodes)) for (const k of ["ttft", "tps", "hit", "kv"]) s[k].shift();
  }
}

function onEvent(name, data) {
  if (name === "hello") store.self = data;
  else if (name === "mesh") {
    store.mesh = data;
    record(data);
  } else if (name === "cache") store.cache = data;
  else if (name === "request") upsertRequest(data);
  changed();
}

async function listen() {
  for (;;) {
    try {
      const r = await api("/api/events");
      if (!r.ok || !r.body) throw new Error(`events: ${r.status}`);
      store.status = "live";
      changed();
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        for (let i = buf.indexOf("\n\n"); i >= 0; i = buf.indexOf("\n\n")) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let name = "message";
          let data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) name = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) onEvent(name, JSON.parse(data));
        }
      }
    } catch {
      if (store.needKey) return;
    }
    store.status = "reconnecting";
    changed();
    await new Promise((r) => setTimeout(r, 1500));
  }
}

async function start() {
  store.needKey = false;
  try {
    const [reqs, cache] = await Promise.all([api("/api/requests?limit=200"), api("/api/cache")]);
    if (reqs.ok) for (const r of (await reqs.json()).data.reverse()) upsertRequest(r);
    if (cache.ok) store.cache = await cache.json();
    changed();
  } catch {
    return;
  }
  void listen();
}

// ---- helpers --------------------------------------------------------------

const fmt = (x, digits = 0) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const bytes = (n) =>
  n >= 1 << 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : n >= 1 << 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
const short = (id) => (id ? id.slice(0, 8) : "–");

function nameOf(id) {
  const m = store.mesh?.members.find((x) => x.id === id);
  return m ? m.name : short(id);
}

// ---- charts ---------------------------------------------------------------

const COLORS = ["#4aa3ff", "#3fbf6f", "#e0b030", "#e0524a", "#b07cff", "#3fc9c9", "#ff8ad8", "#9aa5b1"];

function Chart({ title, field, scale = 1, unit = "" }) {
  const el = useRef(null);
  const plot = useRef(null);
  const s = useStore();
  const ids = Object.keys(s.history.nodes);
  const shape = ids.join(",");
  useEffect(() => {
    if (!el.current) return;
    const opts = {
      title,
      width: el.current.clientWidth || 420,
      height: 180,
      series: [
        {},
        ...ids.map((id, i) => ({
          label: nameOf(id),
          stroke: COLORS[i % COLORS.length],
          spanGaps: true,
          value: (_, v) => (v === null ? "–" : `${v.toFixed(1)}${unit}`),
        })),
      ],
      axes: [
        { stroke: "#8592a0", grid: { stroke: "#2a3440" } },
        { stroke: "#8592a0", grid: { stroke: "#2a3440" } },
      ],
    };
    plot.current = new uPlot(opts, [[]], el.current);
    return () => plot.current?.destroy();
  }, [shape]);
  useEffect(() => {
    const h = s.history;
    plot.current?.setData([h.t, ...ids.map((id) => h.nodes[id][field].map((v) => (v === null ? null : v * scale)))]);
  });
  return html`<div class="graph" ref=${el}></div>`;
}

function Charts() {
  return html`<div class="charts">
    <${Chart} title="TTFT per node (ms, median over 60 s)" field="ttft" unit=" ms" />
    <${Chart} title="decode tokens/s per node" field="tps" />
    <${Chart} title="cache hit rate (cached / prompt tokens, %)" field="hit" scale=${100} unit="%" />
    <${Chart} title="KV use (%)" field="kv" scale=${100} unit="%" />
  </div>`;
}

// ---- mesh view ------------------------------------------------------------

function Graph({ members }) {
  const w = 560;
  const hgt = 280;
  const r = Math.min(w, hgt) / 2 - 50;
  const pos = members.map((m, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, members.length) - Math.PI / 2;
    const rr = members.length === 1 ? 0 : r;
    return { m, x: w / 2 + rr * Math.cos(a), y: hgt / 2 - 20 + rr * Math.sin(a) };
  });
  const links = [];
  for (let i = 0; i < pos.length; i++)
    for (let j = i + 1; j < pos.length; j++) {
      const a = pos[i];
      const b = pos[j];
      if (a.m.state === "dead" || b.m.state === "dead" || a.m.state === "left" || b.m.state === "left") continue;
      const dashed = a.m.state === "suspect" || b.m.state === "suspect";
      links.push(
        html`<line x1=${a.x} y1=${a.y} x2=${b.x} y2=${b.y} stroke="#2a3440" stroke-width="2" stroke-dasharray=${dashed ? "4 4" : ""} />`,
      );
    }
  const fill = { alive: "#3fbf6f", suspect: "#e0b030", dead: "#e0524a", left: "#6c7682" };
  return html`<svg class="graph" width=${w} height=${hgt} viewBox="0 0 ${w} ${hgt}">
    ${links}
    ${pos.map(
      ({ m, x, y }) => html`<g>
        <circle cx=${x} cy=${y} r="18" fill=${fill[m.state] ?? "#6c7682"} stroke=${m.self ? "#fff" : "none"} stroke-width="2" />
        <text x=${x} y=${y + 34} fill="#d8dee6" font-size="13" text-anchor="middle">${m.name}${m.self ? " (this node)" : ""}</text>
        <text x=${x} y=${y + 50} fill="#8592a0" font-size="11" text-anchor="middle">${m.state}${m.rtt_ms !== null ? ` · ${fmt(m.rtt_ms, 1)} ms` : ""} · ${m.models.join(", ") || "no model"}</text>
      </g>`,
    )}
  </svg>`;
}

function KvBar({ kv }) {
  if (!kv || kv.total === 0) return html`<div class="muted">KV: –</div>`;
  const part = (n, color, label) => html`<span style="width:${(100 * n) / kv.total}%;background:${color}" title="${label}: ${n}"></span>`;
  return html`<div>
    <div class="bar">${part(kv.running, "var(--running)", "running")}${part(kv.reserved, "var(--reserved)", "reserved")}${part(kv.resident, "var(--resident)", "resident")}</div>
    <div class="muted" style="font-size:12px">KV cells: ${kv.running} running · ${kv.reserved} reserved · ${kv.resident} idle cache · ${kv.free} free of ${kv.total}</div>
  </div>`;
}

function NodeCard({ m, report, mis }) {
  return html`<div class="card" data-testid="member" data-name=${m.name} data-state=${m.state}>
    <h3>${m.name} <span class="state ${m.state}">${m.state}</span></h3>
    <div class="kv">
      <span class="muted">node</span><span class="hash">${short(m.id)} · ${m.addr}</span>
      <span class="muted">RTT</span><span>${m.self ? "this node" : m.rtt_ms === null ? "–" : `${fmt(m.rtt_ms, 1)} ms`}</span>
      <span class="muted">backend</span><span>${report?.backends.join(", ") || "–"}</span>
      <span class="muted">serves</span><span>${m.models.join(", ") || "nothing"}</span>
      <span class="muted">slots</span><span>${m.slots_busy} / ${m.slots_total} busy · queue ${m.queue_depth}</span>
      <span class="muted">recent (60 s)</span><span>${report ? `${report.recent.requests} req · TTFT ${fmt(report.recent.ttftMs)} ms · ${fmt(report.recent.tokensPerS, 1)} tok/s · hit ${report.recent.hitRate === null ? "–" : `${fmt(report.recent.hitRate * 100)}%`}` : "–"}</span>
      <span class="muted">mispredicted</span><span>${mis ? `${mis.short} of ${mis.checked} cache routes` : "0"}</span>
    </div>
    ${(report?.models ?? []).map(
      (x) => html`<div style="margin-top:8px">
        <div><b>${x.id}</b> <span class="muted">${x.status}${x.ctx ? ` · ctx ${x.ctx}` : ""}${x.randomWeights ? " · random weights" : ""}</span></div>
        <${KvBar} kv=${x.kv} />
        <div class="muted" style="font-size:12px">host-RAM tier: ${x.hostCache ? `${bytes(x.hostCache.bytes)} of ${bytes(x.hostCache.capacity)} · ${x.hostCache.entries} entries` : "–"}</div>
      </div>`,
    )}
  </div>`;
}

function MeshView() {
  const s = useStore();
  const mesh = s.mesh;
  if (!mesh) return html`<p class="muted">waiting for the first snapshot…</p>`;
  const members = [...mesh.members].sort((a, b) => a.name.localeCompare(b.name));
  const alive = members.filter((m) => m.state === "alive").length;
  return html`<div>
    <p class="muted">${members.length} members, ${alive} alive · routing ${mesh.routing?.mode ?? "–"} · seen from ${nameOf(mesh.self)}</p>
    <${Graph} members=${members} />
    <div class="grid" style="margin-top:12px">
      ${members.map((m) => html`<${NodeCard} m=${m} report=${mesh.nodes[m.id]} mis=${mesh.mispredictions[m.id]} />`)}
    </div>
    <${Charts} />
  </div>`;
}

// ---- requests view --------------------------------------------------------

function Explanation({ r }) {
  const e = r.explanation;
  return html`<div class="card" data-testid="explanation" style="margin-top:12px">
    <h3>Route explanation <span class="muted">(${r.id})</span></h3>
    <p>
      ${r.api} · ${r.model} · entered at <b>${nameOf(r.entry)}</b>, ran on <b>${nameOf(r.servedBy)}</b> · route <b>${r.route}</b>
      · prompt ${fmt(r.promptChars)} chars, key hash <span class="hash">${r.promptHash ?? "–"}</span>
    </p>
    <p data-testid="prediction">
      predicted cached tokens <b data-testid="predicted">${fmt(r.predictedCachedTokens)}</b> · actual <b data-testid="actual">${fmt(r.cachedTokens)}</b>
      ${r.prediction ? html` · <span class=${r.prediction}>${r.prediction === "agree" ? "prediction held" : r.prediction === "short" ? "less was cached than predicted" : "more was cached than predicted"}</span>` : ""}
    </p>
    ${
      e
        ? html`<table>
            <thead><tr><th>candidate</th><th>predicted cached</th><th>via</th><th>load</th><th>KV</th><th>est. cost</th><th>wait / prefill / hop</th><th>verdict</th></tr></thead>
            <tbody>
              ${e.candidates.map(
                (c) => html`<tr data-testid="candidate">
                  <td>${nameOf(c.node)}${c.local ? " (entry)" : ""}</td>
                  <td>${c.predictedCachedTokens}</td>
                  <td>${c.via ?? "–"}</td>
                  <td>${fmt(c.load, 2)}</td>
                  <td>${fmt(c.kvFill * 100)}%</td>
                  <td>${fmt(c.costMs, 1)} ms</td>
                  <td>${fmt(c.waitMs, 1)} / ${fmt(c.prefillMs, 1)} / ${fmt(c.hopMs, 1)}</td>
                  <td class=${c.won ? "won" : "lost"}>${c.won ? "won: " : "lost: "}${c.why}</td>
                </tr>`,
              )}
            </tbody>
          </table>
          ${e.omitted > 0 ? html`<p class="muted">${e.omitted} more candidates not shown</p>` : ""}`
        : html`<p class="muted">No routing decision on this node: ${r.entry !== store.mesh?.self ? "a peer sent it here to run" : "it ran where it arrived"}.</p>`
    }
  </div>`;
}

/** The whole mesh's log, polled while shown (events carry only this node's requests). */
function useMeshRequests(on) {
  const [rows, setRows] = useState([]);
  useEffect(() => {
    if (!on) return;
    let live = true;
    const poll = async () => {
      try {
        const r = await api("/api/requests?scope=mesh&limit=300");
        if (r.ok && live) setRows((await r.json()).data);
      } catch {
        // the next poll tries again
      }
    };
    void poll();
    const t = setInterval(poll, 2000);
    return () => {
      live = false;
      clearInterval(t);
    };
  }, [on]);
  return rows;
}

function RequestsView() {
  const s = useStore();
  const [f, setF] = useState({ model: "", node: "", route: "", status: "" });
  const [scope, setScope] = useState("node");
  const [sel, setSel] = useState(null);
  const meshRows = useMeshRequests(scope === "mesh");
  const all = scope === "mesh" ? meshRows : s.requests;
  const rows = all.filter(
    (r) =>
      (!f.model || r.model === f.model) &&
      (!f.node || r.servedBy === f.node || r.entry === f.node) &&
      (!f.route || r.route === f.route) &&
      (!f.status || (f.status === "ok" ? r.status !== null && r.status < 400 : r.status !== null && r.status >= 400)),
  );
  const models = [...new Set(all.map((r) => r.model))];
  const nodes = s.mesh?.members ?? [];
  const picked = all.find((r) => r.id === sel);
  const opt = (v, label) => html`<option value=${v}>${label}</option>`;
  return html`<div>
    <div class="filters">
      <select data-testid="scope" value=${scope} onChange=${(e) => setScope(e.target.value)}>${opt("node", "through this node")}${opt("mesh", "whole mesh")}</select>
      <select data-testid="filter-model" value=${f.model} onChange=${(e) => setF({ ...f, model: e.target.value })}>${opt("", "any model")}${models.map((m) => opt(m, m))}</select>
      <select value=${f.node} onChange=${(e) => setF({ ...f, node: e.target.value })}>${opt("", "any node")}${nodes.map((m) => opt(m.id, m.name))}</select>
      <select data-testid="filter-route" value=${f.route} onChange=${(e) => setF({ ...f, route: e.target.value })}>${["", "local", "cache", "load", "split"].map((v) => opt(v, v || "any route"))}</select>
      <select value=${f.status} onChange=${(e) => setF({ ...f, status: e.target.value })}>${opt("", "any status")}${opt("ok", "ok")}${opt("error", "errors")}</select>
      <span class="muted">${rows.length} of ${all.length} requests (prompt text is never shown: sizes and hashes only)</span>
    </div>
    <table>
      <thead><tr><th>time</th><th>entry</th><th>served by</th><th>model</th><th>route</th><th>prompt</th><th>cached</th><th>predicted</th><th>completion</th><th>TTFT</th><th>tok/s</th><th>status</th></tr></thead>
      <tbody>
        ${rows.map(
          (
            r,
          ) => html`<tr class="row ${r.id === sel ? "sel" : ""}" data-testid="request" data-route=${r.route} data-id=${r.id} data-entry=${nameOf(r.entry)} onClick=${() => setSel(r.id)}>
            <td>${new Date(r.at).toLocaleTimeString()}</td>
            <td>${nameOf(r.entry)}</td>
            <td>${r.servedBy ? nameOf(r.servedBy) : "…"}</td>
            <td>${r.model}</td>
            <td>${r.route}</td>
            <td>${fmt(r.promptTokens)}</td>
            <td>${fmt(r.cachedTokens)}</td>
            <td class=${r.prediction ?? ""}>${fmt(r.predictedCachedTokens)}</td>
            <td>${fmt(r.completionTokens)}</td>
            <td>${r.ttftMs === null ? "–" : `${fmt(r.ttftMs)} ms`}</td>
            <td>${fmt(r.tokensPerS, 1)}</td>
            <td>${r.status ?? "…"}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    ${picked ? html`<${Explanation} r=${picked} />` : html`<p class="muted">Click a request to see why it went where it did.</p>`}
  </div>`;
}

// ---- cache view -----------------------------------------------------------

const DEPTHS = ["1", "2-3", "4-7", "8-15", "16+"];
const AGES = ["<10 s", "<1 min", "<10 min", "older"];

function Buckets({ labels, counts }) {
  const max = Math.max(1, ...counts);
  return html`<table>${labels.map(
    (l, i) =>
      html`<tr><td class="muted" style="width:70px">${l}</td><td><div class="bar" style="width:${Math.max(2, (100 * counts[i]) / max)}%;background:var(--accent)"></div></td><td>${counts[i]}</td></tr>`,
  )}</table>`;
}

function CacheView() {
  const s = useStore();
  const c = s.cache;
  if (!c) return html`<p class="muted">loading the routing index…</p>`;
  return html`<div>
    ${c.models.length === 0 ? html`<p class="muted">The routing index is empty: no engine has reported a cached prefix yet.</p>` : ""}
    <div class="grid">
      ${c.models.map(
        (m) => html`<div class="card" data-testid="index-model">
          <h3>${m.model}</h3>
          <p>${m.entries} prefixes · ${bytes(m.bytes)} · held by ${Object.entries(m.byHolder)
            .map(([id, n]) => `${nameOf(id)} (${n})`)
            .join(", ")}</p>
          <div class="muted">by length (key blocks)</div><${Buckets} labels=${DEPTHS} counts=${m.byDepth} />
          <div class="muted">by age</div><${Buckets} labels=${AGES} counts=${m.byAge} />
          <div class="muted" style="margin-top:6px">most recently used (path hashes, never text)</div>
          <table>${m.recent.map((e) => html`<tr><td class="hash">${e.hash}</td><td>${e.depth} blocks</td><td>${e.holders.map(nameOf).join(", ")}</td><td>${fmt(e.ageMs / 1000)} s</td></tr>`)}</table>
        </div>`,
      )}
    </div>
    <div class="card" style="margin-top:12px">
      <h3>Index sync with each peer</h3>
      <table>
        <thead><tr><th>peer</th><th>last ack of ours</th><th>last batch of theirs</th><th>pending changes</th><th>failures</th><th>unresolved parents</th></tr></thead>
        <tbody>${c.sync.map(
          (p) =>
            html`<tr><td>${nameOf(p.node)}</td><td>${p.sinceAckMs === null ? "never" : `${fmt(p.sinceAckMs / 1000, 1)} s ago`}</td><td>${p.sinceAppliedMs === null ? "never" : `${fmt(p.sinceAppliedMs / 1000, 1)} s ago`}</td><td>${p.pendingOps}</td><td>${p.fails}</td><td>${p.unresolved}</td></tr>`,
        )}</tbody>
      </table>
    </div>
    <div class="charts"><${Chart} title="cache hit rate over time (%)" field="hit" scale=${100} unit="%" /></div>
  </div>`;
}

// ---- chat view ------------------------------------------------------------

function ChatView() {
  const [models, setModels] = useState([]);
  const [model, setModel] = useState("");
  const [msgs, setMsgs] = useState([]);
  const [text, setText] = useState("");
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    api("/v1/models")
      .then((r) => r.json())
      .then((l) => {
        const ids = l.data.filter((m) => !m.alias_of).map((m) => m.id);
        setModels(ids);
        setModel((x) => x || ids[0] || "");
      })
      .catch(() => {});
  }, []);
  const send = async () => {
    if (!text.trim() || busy) return;
    const history = [...msgs.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content })), { role: "user", content: text }];
    const reply = { role: "assistant", content: "", meta: null };
    setMsgs([...msgs, { role: "user", content: text }, reply]);
    setText("");
    setBusy(true);
    const t0 = performance.now();
    let first = 0;
    try {
      const r = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model, messages: history, stream: true, stream_options: { include_usage: true }, max_tokens: 64 }),
      });
      const node = r.headers.get("x-mesh-node");
      const route = r.headers.get("x-mesh-route");
      if (!r.ok || !r.body) throw new Error((await r.json().catch(() => null))?.error?.message ?? `HTTP ${r.status}`);
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      let usage = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
          const line = buf.slice(0, i).trim();
          buf = buf.slice(i + 1);
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            if (!first) first = performance.now();
            reply.content += delta;
          }
          if (chunk.usage) usage = chunk.usage;
          setMsgs((m) => [...m]);
        }
      }
      const end = performance.now();
      const n = usage?.completion_tokens ?? 0;
      reply.meta = {
        node,
        route,
        cached: usage?.prompt_tokens_details?.cached_tokens ?? null,
        prompt: usage?.prompt_tokens ?? null,
        ttft: first ? first - t0 : null,
        // A reply that arrived in one piece has no measurable decode time.
        tps: first && n > 1 && end - first >= 5 ? (n - 1) / ((end - first) / 1000) : null,
      };
    } catch (e) {
      reply.error = true;
      reply.content = `error: ${e.message}`;
    }
    setMsgs((m) => [...m]);
    setBusy(false);
  };
  return html`<div class="chat">
    <div class="filters">
      <select data-testid="chat-model" value=${model} onChange=${(e) => setModel(e.target.value)}>${models.map((m) => html`<option value=${m}>${m}</option>`)}</select>
      <button class="btn" onClick=${() => setMsgs([])}>new conversation</button>
      <span class="muted">your own messages are sent to the mesh; the request log never shows them</span>
    </div>
    ${msgs.map(
      (m, i) => html`<div class="msg ${m.role}" data-testid=${m.role === "assistant" ? "reply" : "mine"} data-index=${i}>
        ${m.content || (m.role === "assistant" && busy ? "…" : "")}
        ${
          m.meta
            ? html`<div class="meta" data-testid="reply-meta" data-node=${m.meta.node ?? ""} data-cached=${m.meta.cached ?? ""}>
                served by <b>${nameOf(m.meta.node)}</b> (${m.meta.route ?? "–"}) · ${fmt(m.meta.cached)} of ${fmt(m.meta.prompt)} prompt tokens cached ·
                TTFT ${fmt(m.meta.ttft)} ms · ${fmt(m.meta.tps, 1)} tok/s
              </div>`
            : ""
        }
      </div>`,
    )}
    <textarea data-testid="chat-input" rows="4" placeholder="Message (Enter sends, Shift+Enter for a new line)" value=${text}
      onInput=${(e) => setText(e.target.value)}
      onKeyDown=${(e) => {
        if (e.key === "Enter" && !e.shiftKey) {
          e.preventDefault();
          void send();
        }
      }}></textarea>
    <div><button class="btn" data-testid="chat-send" disabled=${busy || !model} onClick=${send}>send</button></div>
  </div>`;
}

// ---- shell ----------------------------------------------------------------

function KeyPrompt() {
  const [k, setK] = useState("");
  return html`<div class="card keybox" data-testid="key-prompt">
    <h3>This node requires an API key</h3>
    <p class="muted">The console reads the same API as clients: give one of the node's keys (--api-key). It is kept in this tab only.</p>
    <form onSubmit=${(e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, k.trim());
      void start();
    }}>
      <input data-testid="key-input" type="password" value=${k} onInput=${(e) => setK(e.target.value)} style="width:100%" placeholder="API key" />
      <div style="margin-top:8px"><button class="btn" type="submit">open the console</button></div>
    </form>
  </div>`;
}

const VIEWS = { mesh: ["Mesh", MeshView], requests: ["Requests", RequestsView], cache: ["Cache", CacheView], chat: ["Chat", ChatView] };

function App() {
  const s = useStore();
  const [view, setView] = useState(location.hash.slice(1) in VIEWS ? location.hash.slice(1) : "mesh");
  useEffect(() => {
    location.hash = view;
  }, [view]);
  const View = useMemo(() => VIEWS[view][1], [view]);
  if (s.needKey) return html`<${KeyPrompt} />`;
  return html`<div>
    <header>
      <h1>mesh</h1>
      <nav>${Object.entries(VIEWS).map(([k, [label]]) => html`<button data-view=${k} class=${k === view ? "on" : ""} onClick=${() => setView(k)}>${label}</button>`)}</nav>
      <span class="muted" data-testid="status" data-status=${s.status}>${s.self ? `${s.self.name} · ` : ""}${s.status}</span>
    </header>
    <main><${View} /></main>
  </div>`;
}

const root = document.getElementById("app");
root.replaceChildren();
render(html`<${App} />`, root);
void start();
