// Token-level trajectories of a session, for training: one per terminal turn
// (or per turn with `all`), each the chain of turns its prompt extends token
// for token. Response tokens the model sampled have mask 1, the end-of-generation
// token a reply stopped on included; the prompt's own tokens between turns (tool
// results, user messages, template markup) have mask 0. One pass to find the
// turns, then O(tokens) per trajectory.
import type { SessionMessage } from "./key";
import type { SessionTrie, TrieNode, Turn } from "./trie";

/** One exported trajectory (snake_case: it is an API and JSONL format). */
export interface Trajectory {
  /** The trie node of the turn it ends with. */
  node_id: number;
  model: string;
  /** Tokens of the first turn's prompt. */
  prompt_ids: number[];
  /** Every token after it: replies and the prompt tokens between them. */
  response_ids: number[];
  /** Per response token: 1 sampled by the model, 0 prompt/tool/template tokens between turns. */
  response_mask: number[];
  /** Per response token: its log-probability (0 where the mask is 0); null unless every turn asked for logprobs. */
  response_logprobs: number[] | null;
  finish_reason: string;
  /** Assistant turns in this trajectory. */
  num_turns: number;
  /** The conversation from the root to the final reply (copies, media by reference). */
  messages: SessionMessage[];
}

/** The trajectory ending at `node` (which must carry a turn). */
export function trajectoryOf(trie: SessionTrie, node: TrieNode): Trajectory {
  const chain: Turn[] = [];
  for (let t = node.turn; t; t = t.prev?.turn ?? null) chain.push(t);
  chain.reverse();
  const first = chain[0] as Turn;
  const last = chain[chain.length - 1] as Turn;
  const withLogprobs = chain.every((t) => t.logprobs !== null);
  // The last reply's end-of-generation token closes the trajectory: the model sampled it.
  const size = last.length - first.promptTail.length + (last.eog >= 0 ? 1 : 0);
  const ids = new Array<number>(size);
  const mask = new Array<number>(size);
  const logprobs = withLogprobs ? new Array<number>(size) : null;
  let at = 0;
  const push = (id: number, m: number, lp: number) => {
    ids[at] = id;
    mask[at] = m;
    if (logprobs) logprobs[at] = lp;
    at++;
  };
  chain.forEach((t, i) => {
    if (i > 0) {
      // Where the template ends a reply with the very token the model stopped on, that token of
      // the next prompt is the sampled one; any other end-of-turn markup is the template's.
      const before = chain[i - 1] as Turn;
      t.promptTail.forEach((id, k) => {
        const sampled = k === 0 && before.eog >= 0 && id === before.eog;
        push(id, sampled ? 1 : 0, sampled ? before.eogLogprob : 0);
      });
    }
    t.response.forEach((id, k) => {
      push(id, 1, t.logprobs ? (t.logprobs[k] as number) : 0);
    });
  });
  if (last.eog >= 0) push(last.eog, 1, last.eogLogprob);
  return {
    node_id: node.id,
    model: last.model,
    prompt_ids: Array.from(first.promptTail),
    response_ids: ids,
    response_mask: mask,
    response_logprobs: logprobs,
    finish_reason: last.finishReason,
    num_turns: chain.length,
    messages: trie.messages(node),
  };
}

/** Trajectories of every terminal turn (or, with `all`, of every turn), in node order. */
export function exportTrajectories(trie: SessionTrie, all = false): Trajectory[] {
  const nodes = all ? [...trie.turns()] : trie.terminals();
  nodes.sort((a, b) => a.id - b.id);
  return nodes.map((n) => trajectoryOf(trie, n));
}

/** Trajectories as JSON Lines, one object per line. */
export function toJsonl(trajectories: readonly Trajectory[]): string {
  return trajectories.map((t) => JSON.stringify(t)).join("\n") + (trajectories.length > 0 ? "\n" : "");
}
