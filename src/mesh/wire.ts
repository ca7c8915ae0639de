/**
 * The contract between the mesh core (membership, replicated state, worker
 * sync) and the plumbing that carries its messages (authenticated HTTP/WS
 * transport, server routes, CLI). The core never touches sockets; the
 * plumbing never interprets messages beyond routing them to `MeshCore.handle`.
 */

/** A node's id: lowercase hex of the first 16 bytes of SHA-256 over its ed25519 public key (raw 32 bytes). */
export type NodeId = string;

/** One JSON-serialisable message between peers; `type` selects the handler. */
export interface WireMessage {
  type: string;
  [field: string]: unknown;
}

/** Carries one request to a peer and resolves with its reply. */
export interface Transport {
  /**
   * Sends `msg` to the peer at `addr` ("host:port"), addressed to node `to` when the caller knows which node it
   * means (any other node at that address refuses it); rejects on timeout, refusal (401) or network error.
   */
  request(addr: string, msg: WireMessage, timeoutMs: number, to?: NodeId): Promise<WireMessage>;
}

/** Time source and timers, so the core runs under virtual time in simulations. */
export interface Clock {
  /** Milliseconds since the epoch (or since the simulation began). */
  now(): number;
  /** Schedules `fn` after `ms`; returns a handle for `clearTimer`. */
  setTimer(fn: () => void, ms: number): unknown;
  /** Cancels a timer made by `setTimer`. */
  clearTimer(handle: unknown): void;
}

/** What routing needs to know about one worker (a model served by one node). */
export interface WorkerInfo {
  /** Deterministic: hash of owner node id + model id + address, so a restarted node keeps it. */
  id: string;
  /** The node that owns (and alone may publish or delete) this record. */
  nodeId: NodeId;
  /** "host:port" where the owner serves the OpenAI API for this model. */
  addr: string;
  /** Model ids this worker answers to: the model it serves first (its id derives from it), then that model's aliases. */
  models: string[];
  ctxSize: number;
  slotsTotal: number;
  slotsBusy: number;
  /** KV cells committed to running requests (held or reserved): what the load gate reads. */
  kvUsed: number;
  /** KV cells holding any prefix, running or idle cache: how much cache the worker keeps. */
  kvCached: number;
  kvTotal: number;
  queueDepth: number;
  health: "loading" | "ready" | "failed";
  /** The compute devices the worker's engine loaded on (absent while loading, and from older nodes). */
  devices?: WorkerDevice[];
}

/** A compute device in a worker record: ggml's name, its backend, its type, memory in bytes as of the model load. */
export interface WorkerDevice {
  name: string;
  backend: string;
  type: "cpu" | "gpu" | "igpu" | "accel";
  free: number;
  total: number;
}
