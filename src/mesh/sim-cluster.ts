// Many MeshCores on one SimNetwork and one VirtualClock: the harness of the
// mesh tests and of the 100-node simulation benchmark.
import { generateIdentity, type Identity } from "./identity";
import type { MemberState } from "./member";
import { type MeshConfig, MeshCore } from "./node";
import { SimNetwork, type SimNetworkOptions, seededRandom, VirtualClock } from "./sim";

/** One simulated node: its core, address and key. */
export interface SimNode {
  name: string;
  addr: string;
  identity: Identity;
  core: MeshCore;
}

/** Options of a simulated cluster. */
export interface SimClusterOptions {
  config?: MeshConfig;
  network?: SimNetworkOptions;
  seed?: number;
}

/** A set of simulated nodes; `addr` of node "a" is "a:9337". */
export class SimCluster {
  readonly clock = new VirtualClock();
  readonly net: SimNetwork;
  readonly nodes = new Map<string, SimNode>();
  private readonly ids = new Map<string, string>();
  private readonly random: () => number;

  constructor(private readonly o: SimClusterOptions = {}) {
    this.random = seededRandom(o.seed ?? 1);
    this.net = new SimNetwork(this.clock, { random: this.random, ...o.network });
  }

  /** Start a node (a fresh one, or a restart when `identity` is given). */
  add(name: string, identity: Identity = generateIdentity(), config: MeshConfig | undefined = this.o.config): SimNode {
    const addr = `${name}:9337`;
    const core = new MeshCore({
      identity,
      self: { name, addr },
      transport: this.net.transport(addr),
      clock: this.clock,
      config,
      random: this.random,
    });
    this.net.listen(addr, (msg, from) => core.handle(msg, this.idAt(from)), identity.id);
    core.start();
    const node = { name, addr, identity, core };
    this.nodes.set(name, node);
    this.ids.set(addr, identity.id);
    return node;
  }

  /** Advance virtual time until `p` settles (a join or leave waits on simulated replies); throws after `maxMs`. */
  async wait<T>(p: Promise<T>, maxMs = 60_000): Promise<T> {
    let done = false;
    const tracked = p.finally(() => {
      done = true;
    });
    if ((await this.clock.until(() => done, maxMs, 10)) === null) throw new Error(`still pending after ${maxMs} virtual ms`);
    return tracked;
  }

  /** Join `name` through the node `via`. */
  async join(name: string, via: string): Promise<void> {
    const r = await this.wait(this.node(name).core.join([this.node(via).addr]));
    if (!r.ok) throw new Error(r.message);
  }

  /** The node called `name`. */
  node(name: string): SimNode {
    const n = this.nodes.get(name);
    if (!n) throw new Error(`no node ${name}`);
    return n;
  }

  /** Stop a node without a word to anyone (kill -9). */
  kill(name: string): void {
    const n = this.node(name);
    this.net.kill(n.addr);
    n.core.stop();
  }

  /** Freeze a node with all its state (SIGSTOP): no timers, no answers. */
  pause(name: string): void {
    this.kill(name);
  }

  /** Thaw a frozen node (SIGCONT): it carries on with the state it had. */
  resume(name: string): void {
    const n = this.node(name);
    this.net.listen(n.addr, (msg, from) => n.core.handle(msg, this.idAt(from)), n.identity.id);
    n.core.start();
  }

  /** The node id at `addr`, as the HTTP transport's authentication would report it. */
  idAt(addr: string): string | undefined {
    return this.ids.get(addr);
  }

  /** The state `observer` holds for `subject` (undefined if unknown). */
  stateOf(observer: string, subject: string): MemberState | undefined {
    return this.node(observer).core.memberState(this.node(subject).identity.id)?.state;
  }

  /** Names of nodes still running. */
  running(except: string[] = []): string[] {
    return [...this.nodes].filter(([name, n]) => n.core.isRunning && !except.includes(name)).map(([name]) => name);
  }

  /** Whether every running node other than `subject` sees it in `state` (undefined: forgotten or never known). */
  allSee(subject: string, state: MemberState | undefined, observers = this.running([subject])): boolean {
    return observers.every((o) => this.stateOf(o, subject) === state);
  }

  /** Whether every running node knows every other running node as alive. */
  converged(): boolean {
    const up = this.running();
    return up.every((o) => up.every((s) => s === o || this.stateOf(o, s) === "alive"));
  }
}
