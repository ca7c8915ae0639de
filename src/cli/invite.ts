// `mesh invite`: the token another machine joins this node's mesh with.
import { encodeInvite } from "../mesh/invite";
import type { MeshInfo } from "../server/mesh-routes";
import { type NodeClientFlags, nodeClient } from "./node-client";

/** Whether `addr` ("host:port") names this machine only: 127.0.0.0/8, ::1 or localhost. */
export function isLoopbackAddr(addr: string): boolean {
  const host = addr
    .replace(/:\d+$/, "")
    .replace(/^\[(.*)\]$/, "$1")
    .toLowerCase();
  return host === "localhost" || host === "::1" || /^(::ffff:)?127\.\d+\.\d+\.\d+$/.test(host);
}

/** Print the invite token of the running node of this state dir; resolves with the exit code. */
export async function invite(o: NodeClientFlags): Promise<number> {
  const node = nodeClient({ ...o, apiKey: undefined });
  const creds = node.creds;
  if (!creds) throw new Error(`no mesh credentials in ${node.stateDir}`);
  // Only a running node is asked: a token with the address it last advertised would send the joiner to a node that is
  // not there (or to whatever took its port), and `mesh serve` prints the token anyway when it starts.
  const info = (await node.get("/mesh/info")) as Partial<MeshInfo> | null;
  const addrs = Array.isArray(info?.addrs) ? info.addrs.filter((a): a is string => typeof a === "string") : [];
  if (addrs.length === 0) throw new Error(`the node at ${node.url} advertises no address to join it at`);
  const token = encodeInvite({ ...creds, addrs });
  process.stdout.write(`${token}\n`);
  if (addrs.every(isLoopbackAddr)) {
    process.stderr.write(
      `mesh: warning: the token only has loopback addresses (${addrs.join(", ")}), so other machines cannot use it; ` +
        "restart the node with --host 0.0.0.0 or --advertise <host:port>\n",
    );
  }
  if (process.stderr.isTTY) process.stderr.write(`on another machine: mesh serve --join ${token}\n`);
  return 0;
}
