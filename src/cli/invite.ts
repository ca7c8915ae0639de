// `mesh invite`: the token another machine joins this node's mesh with.
import { encodeInvite } from "../mesh/invite";
import type { MeshInfo } from "../server/mesh-routes";
import { type NodeClientFlags, nodeClient } from "./node-client";

/** Print the invite token of the node of this state dir; resolves with the exit code. */
export async function invite(o: NodeClientFlags): Promise<number> {
  const node = nodeClient({ ...o, apiKey: undefined });
  const creds = node.creds;
  if (!creds) throw new Error(`no mesh credentials in ${node.stateDir}`);
  let addrs: string[];
  try {
    addrs = ((await node.get("/mesh/info")) as MeshInfo).addrs;
  } catch (e) {
    // The credentials alone make a token; the address comes from the node's last start.
    if (!node.record) throw e;
    process.stderr.write(`mesh: ${(e as Error).message}; using the address it last advertised (${node.record.addr})\n`);
    addrs = [node.record.addr];
  }
  const token = encodeInvite({ ...creds, addrs });
  process.stdout.write(`${token}\n`);
  if (process.stderr.isTTY) process.stderr.write(`on another machine: mesh serve --join ${token}\n`);
  return 0;
}
