import { describe, expect, test } from "bun:test";
import { exportTrajectories, type SessionMessage, SessionTrie, type TurnInput, toolsKey } from "../../src/sessions";

const sys = (content: string): SessionMessage => ({ role: "system", content });
const user = (content: string): SessionMessage => ({ role: "user", content });
const asst = (content: string): SessionMessage => ({ role: "assistant", content });

let ckpt = 0;
/** A turn whose prompt is `prompt` and reply `reply` (token ids), with a fresh checkpoint key. */
const turn = (prompt: number[], reply: number[], tools = ""): TurnInput => ({
  promptIds: prompt,
  responseIds: reply,
  logprobs: null,
  finishReason: "stop",
  toolsKey: tools,
  checkpoint: `ck${++ckpt}`,
  model: "m",
});

/** Run one request through the trie: begin, then commit the reply. */
function run(trie: SessionTrie, messages: SessionMessage[], reply: string, t: TurnInput, tools = "") {
  const b = trie.begin(messages, tools);
  const released = trie.commit(b, asst(reply), t);
  return { b, released };
}

describe("fork types", () => {
  test("sequential_extension_reattaches_at_the_previous_reply_checkpoint", () => {
    const trie = new SessionTrie();
    const h1 = [sys("s"), user("u1")];
    run(trie, h1, "a1", turn([1, 2, 3], [4, 5]));
    const b = trie.begin([...h1, asst("a1"), user("u2")], "");
    expect(b.matched).toBe(3);
    expect(b.nearest?.turn?.checkpoint).toBe(`ck${ckpt}`);
    trie.commit(b, asst("a2"), turn([1, 2, 3, 4, 5, 6, 7], [8]));
    const [t] = exportTrajectories(trie);
    expect(t?.prompt_ids).toEqual([1, 2, 3]);
    expect(t?.response_ids).toEqual([4, 5, 6, 7, 8]);
    expect(t?.response_mask).toEqual([1, 1, 0, 0, 1]);
    expect(t?.num_turns).toBe(2);
    expect(exportTrajectories(trie).length).toBe(1);
  });

  test("parallel_branches_with_different_system_prompts_do_not_share_checkpoints", () => {
    const trie = new SessionTrie();
    run(trie, [sys("planner"), user("task")], "plan", turn([1, 2], [3]));
    const b = trie.begin([sys("coder"), user("task")], "");
    expect(b.matched).toBe(0);
    expect(b.nearest).toBeNull();
    trie.commit(b, asst("code"), turn([9, 2], [4]));
    const all = exportTrajectories(trie);
    expect(all.length).toBe(2);
    expect(all.map((t) => t.prompt_ids)).toEqual([
      [1, 2],
      [9, 2],
    ]);
    expect(trie.stats().branches).toBe(2);
  });

  test("condensation_starts_a_new_trajectory_when_the_history_is_replaced_by_a_summary", () => {
    const trie = new SessionTrie();
    const h = [sys("s"), user("u1")];
    run(trie, h, "a1", turn([1, 2], [3]));
    run(trie, [...h, asst("a1"), user("u2")], "a2", turn([1, 2, 3, 4], [5]));
    // The agent condenses: same system prompt, the history replaced by one summary message.
    const b = trie.begin([sys("s"), user("summary of u1 a1 u2 a2"), user("u3")], "");
    expect(b.matched).toBe(1);
    expect(b.nearest).toBeNull();
    trie.commit(b, asst("a3"), turn([1, 7, 8], [9]));
    const all = exportTrajectories(trie);
    expect(all.length).toBe(2);
    expect(all[0]?.num_turns).toBe(2);
    expect(all[1]).toMatchObject({ prompt_ids: [1, 7, 8], response_ids: [9], response_mask: [1], num_turns: 1 });
  });

  test("best_of_n_siblings_each_export_and_an_idempotent_retry_replaces_instead_of_adding", () => {
    const trie = new SessionTrie();
    const h = [sys("s"), user("u")];
    const branches = [0, 1, 2, 3].map(() => trie.begin(h, ""));
    // All four are in flight at once and share the pending prompt nodes.
    expect(trie.stats().pending).toBe(4);
    branches.forEach((b, i) => {
      trie.commit(b, asst(`answer ${i}`), turn([1, 2], [10 + i]));
    });
    expect(exportTrajectories(trie).map((t) => t.response_ids)).toEqual([[10], [11], [12], [13]]);
    expect(trie.stats().branches).toBe(4);
    const old = [...trie.turns()].find((n) => n.message?.content === "answer 2")?.turn?.checkpoint;
    // The client retries sibling 2 and gets the same text back: same node, new turn, old checkpoint released.
    const { released } = run(trie, h, "answer 2", turn([1, 2], [99]));
    expect(released).toEqual([old as string]);
    expect(trie.stats().branches).toBe(4);
    expect(exportTrajectories(trie).map((t) => t.response_ids)).toEqual([[10], [11], [99], [13]]);
  });

  // Regression (review): a retry that replaced a turn's tokens left the turns after it cut against the old
  // tokens, so their trajectories came out with the wrong length and holes (null ids and masks).
  test("a_retry_with_other_tokens_keeps_every_later_turns_prompt_whole", () => {
    const trie = new SessionTrie();
    const h = [user("u")];
    run(trie, h, "a", turn([1], [2, 3]));
    run(trie, [...h, asst("a"), user("v")], "b", turn([1, 2, 3, 9, 5], [6]));
    // The same text again (thinking is not in the key) from other tokens: shorter, then longer.
    let bytes = trie.stats().bytes;
    let tail = 2;
    let replyLength = 2;
    for (const reply of [[7], [7, 8, 8]]) {
      run(trie, h, "a", { ...turn([1], reply), finishReason: "length" });
      // The bound counts what is stored: the later turn's prompt now whole (5 tokens), the new reply's tokens.
      expect(trie.stats().bytes).toBe(bytes + 4 * (5 - tail) + 4 * (reply.length - replyLength));
      bytes = trie.stats().bytes;
      tail = 5;
      replyLength = reply.length;
      const all = exportTrajectories(trie, true);
      for (const t of all) {
        expect(t.response_ids.length).toBe(t.response_mask.length);
        expect(t.response_ids.every((id) => typeof id === "number")).toBe(true);
        expect(t.response_mask.every((m) => m === 0 || m === 1)).toBe(true);
      }
      const later = all.find((t) => t.response_ids.at(-1) === 6);
      // Its prompt no longer starts with the replaced reply: a trajectory of its own, its prompt whole.
      expect(later?.num_turns).toBe(1);
      expect([...(later?.prompt_ids ?? []), ...(later?.response_ids ?? [])]).toEqual([1, 2, 3, 9, 5, 6]);
    }
  });

  test("a_retry_whose_tokens_the_later_prompt_still_starts_with_keeps_the_chain", () => {
    const trie = new SessionTrie();
    const h = [user("u")];
    run(trie, h, "a", turn([1], [2, 3]));
    run(trie, [...h, asst("a"), user("v")], "b", turn([1, 2, 3, 9, 5], [6]));
    run(trie, h, "a", turn([1], [2]));
    const [t] = exportTrajectories(trie);
    expect(t?.num_turns).toBe(2);
    expect(t?.prompt_ids).toEqual([1]);
    // 3 was sampled by the replaced reply only: now it is prompt between the turns (mask 0).
    expect(t?.response_ids).toEqual([2, 3, 9, 5, 6]);
    expect(t?.response_mask).toEqual([1, 0, 0, 0, 1]);
    expect(trie.stats().bytes).toBeGreaterThan(0);
  });

  test("warm_start_from_a_saved_prefix_reuses_its_checkpoint_for_a_new_question", () => {
    const trie = new SessionTrie();
    const prefix = [sys("long shared context"), user("read the repo"), asst("done reading")];
    // The saved prefix: a turn that produced "done reading".
    run(trie, prefix.slice(0, 2), "done reading", turn([1, 2, 3], [4]));
    const q1 = trie.begin([...prefix, user("question 1")], "");
    const q2 = trie.begin([...prefix, user("question 2")], "");
    expect(q1.nearest).toBe(q2.nearest as NonNullable<typeof q2.nearest>);
    expect(q1.nearest?.turn?.checkpoint).toBeString();
    trie.commit(q1, asst("r1"), turn([1, 2, 3, 4, 5], [6]));
    trie.commit(q2, asst("r2"), turn([1, 2, 3, 4, 7], [8]));
    expect(exportTrajectories(trie).map((t) => t.response_ids)).toEqual([
      [4, 5, 6],
      [4, 7, 8],
    ]);
  });

  test("a_tools_change_between_turns_gives_no_checkpoint_to_reattach_at", () => {
    const trie = new SessionTrie();
    const h = [user("u1")];
    const toolsA = toolsKey([{ type: "function", function: { name: "a" } }]);
    const toolsB = toolsKey([{ type: "function", function: { name: "b" } }]);
    run(trie, h, "a1", turn([1], [2], toolsA), toolsA);
    expect(trie.begin([...h, asst("a1"), user("u2")], toolsA).nearest).not.toBeNull();
    expect(trie.begin([...h, asst("a1"), user("u2")], toolsB).nearest).toBeNull();
  });
});

describe("pending branches", () => {
  test("abandoned_branch_leaves_no_pending_nodes", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", turn([1], [2]));
    const before = trie.stats();
    const b = trie.begin([user("u"), asst("a"), user("new 1"), user("new 2")], "");
    expect(trie.stats().nodes).toBe(before.nodes + 2);
    trie.abandon(b);
    trie.abandon(b);
    expect(trie.stats()).toEqual(before);
  });

  test("abandoning_one_sibling_keeps_the_prompt_nodes_another_sibling_still_holds", () => {
    const trie = new SessionTrie();
    const a = trie.begin([user("shared new prompt")], "");
    const b = trie.begin([user("shared new prompt")], "");
    trie.abandon(a);
    expect(trie.stats().nodes).toBe(1);
    trie.commit(b, asst("reply"), turn([1], [2]));
    expect(exportTrajectories(trie).length).toBe(1);
  });

  test("commit_after_abandon_changes_nothing_and_hands_back_its_checkpoint", () => {
    const trie = new SessionTrie();
    const b = trie.begin([user("u")], "");
    trie.abandon(b);
    expect(trie.commit(b, asst("late"), { ...turn([1], [2]), checkpoint: "late" })).toEqual(["late"]);
    expect(trie.stats().nodes).toBe(0);
  });
});

describe("stored messages are copies", () => {
  test("caller_mutating_its_request_after_begin_does_not_change_the_trie", () => {
    const trie = new SessionTrie();
    const msgs = [user("original")];
    run(trie, msgs, "reply", turn([1], [2]));
    (msgs[0] as SessionMessage).content = "mutated";
    expect(trie.begin([user("original"), asst("reply"), user("next")], "").matched).toBe(2);
  });

  test("mutating_exported_messages_does_not_change_the_trie", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", turn([1], [2]));
    const [t] = exportTrajectories(trie);
    (t?.messages[0] as SessionMessage).content = "changed";
    expect(exportTrajectories(trie)[0]?.messages[0]?.content).toBe("u");
  });

  test("an_idempotent_retry_replaces_the_stored_reply_whole_with_no_stale_fields", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", { ...turn([1], [2]), logprobs: [-0.5] });
    const replyWithExtra: SessionMessage = { role: "assistant", content: "a", reasoning_content: "old thoughts" };
    const b = trie.begin([user("u")], "");
    trie.commit(b, { role: "assistant", content: "a" }, turn([1], [3]));
    void replyWithExtra;
    const [t] = exportTrajectories(trie);
    expect(t?.response_logprobs).toBeNull();
    expect(t?.response_ids).toEqual([3]);
    expect(t?.messages[1]).toEqual({ role: "assistant", content: "a" });
  });
});

describe("bounds", () => {
  test("a_session_past_its_branch_limit_is_refused_and_unchanged", () => {
    const trie = new SessionTrie({ maxBranches: 3, maxBytes: 1 << 20, maxPending: 8 });
    for (let i = 0; i < 3; i++) run(trie, [user(`q${i}`)], "a", turn([i], [1]));
    const before = trie.stats();
    expect(() => trie.begin([user("q9")], "")).toThrow(/branches/);
    expect(trie.stats()).toEqual(before);
    // Extending an existing branch adds no branch: still allowed.
    expect(() => trie.begin([user("q0"), asst("a"), user("more")], "")).not.toThrow();
  });

  test("a_session_past_its_byte_limit_is_refused_and_unchanged", () => {
    const trie = new SessionTrie({ maxBranches: 100, maxBytes: 4096, maxPending: 8 });
    run(trie, [user("small")], "a", turn([1], [2]));
    const before = trie.stats();
    expect(() => trie.begin([user("x".repeat(5000))], "")).toThrow(/bytes/);
    expect(trie.stats()).toEqual(before);
  });

  test("requests_in_flight_past_the_pending_limit_are_refused", () => {
    const trie = new SessionTrie({ maxBranches: 100, maxBytes: 1 << 20, maxPending: 2 });
    trie.begin([user("a")], "");
    const b = trie.begin([user("a")], "");
    expect(() => trie.begin([user("a")], "")).toThrow(/in flight/);
    trie.abandon(b);
    expect(() => trie.begin([user("a")], "")).not.toThrow();
  });

  test("a_long_linear_run_stores_each_prompt_token_once", () => {
    const trie = new SessionTrie();
    let msgs: SessionMessage[] = [user("u0")];
    let seq: number[] = [];
    for (let i = 0; i < 50; i++) {
      const prompt = [...seq, ...Array.from({ length: 100 }, (_, k) => i * 1000 + k)];
      const reply = [i * 1000 + 500];
      run(trie, msgs, `a${i}`, turn(prompt, reply));
      seq = [...prompt, ...reply];
      msgs = [...msgs, asst(`a${i}`), user(`u${i + 1}`)];
    }
    // 50 turns of 101 new tokens: linear, not the ~1 MB that full prompts per turn would take.
    expect(trie.stats().bytes).toBeLessThan(64 * 1024);
    const [t] = exportTrajectories(trie);
    expect((t?.prompt_ids.length ?? 0) + (t?.response_ids.length ?? 0)).toBe(seq.length);
  });
});

describe("export", () => {
  test("export_all_lists_every_turn_and_default_only_terminals", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", turn([1], [2]));
    run(trie, [user("u"), asst("a"), user("v")], "b", turn([1, 2, 3], [4]));
    expect(exportTrajectories(trie).length).toBe(1);
    expect(exportTrajectories(trie, true).map((t) => t.num_turns)).toEqual([1, 2]);
  });

  test("export_visits_each_node_a_bounded_number_of_times_on_a_deep_trie", () => {
    // A chain of turns: a per-node descendant scan (O(N*D)) would read children maps ~N*D/2 times.
    const trie = new SessionTrie();
    let msgs: SessionMessage[] = [user("u")];
    for (let i = 0; i < 200; i++) {
      run(trie, msgs, `a${i}`, { ...turn([], []), promptIds: [i], responseIds: [i] });
      msgs = [...msgs, asst(`a${i}`), user(`u${i}`)];
    }
    let reads = 0;
    let nodes = 0;
    const stack = [trie.root];
    while (stack.length > 0) {
      const n = stack.pop() as typeof trie.root;
      nodes++;
      const values = n.children.values.bind(n.children);
      n.children.values = () => {
        reads++;
        return values();
      };
      stack.push(...n.children.values());
    }
    reads = 0;
    expect(trie.terminals().length).toBe(1);
    expect(reads).toBeLessThanOrEqual(2 * nodes);
    expect(exportTrajectories(trie, true).length).toBe(200);
  });

  test("logprobs_are_exported_with_zeros_between_turns_when_every_turn_asked", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", { ...turn([1], [2]), logprobs: [-0.25] });
    run(trie, [user("u"), asst("a"), user("v")], "b", { ...turn([1, 2, 3], [4]), logprobs: [-1.5] });
    expect(exportTrajectories(trie)[0]?.response_logprobs).toEqual([-0.25, 0, -1.5]);
  });

  // Regression: a reply that stopped on its end-of-generation token lost it from the trajectory, so the
  // model's choice to stop was never a sampled (mask 1) token.
  test("the_end_of_generation_token_a_reply_stopped_on_is_sampled_where_the_next_prompt_has_it_and_at_the_end", () => {
    const EOG = 99;
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", { ...turn([1], [2]), logprobs: [-0.25], eog: { token: EOG, logprob: -0.5 } });
    // The template ends the reply with the very token the model stopped on.
    run(trie, [user("u"), asst("a"), user("v")], "b", {
      ...turn([1, 2, EOG, 3], [4]),
      logprobs: [-1.5],
      eog: { token: EOG, logprob: -0.125 },
    });
    const [t] = exportTrajectories(trie);
    expect(t?.response_ids).toEqual([2, EOG, 3, 4, EOG]);
    expect(t?.response_mask).toEqual([1, 1, 0, 1, 1]);
    expect(t?.response_logprobs).toEqual([-0.25, -0.5, 0, -1.5, -0.125]);
    expect(t?.num_turns).toBe(2);
  });

  test("an_end_of_turn_markup_other_than_the_sampled_token_stays_the_templates", () => {
    const trie = new SessionTrie();
    run(trie, [user("u")], "a", { ...turn([1], [2]), eog: { token: 99 } });
    // This template closes the reply with its own markup (7), not the token the model stopped on.
    run(trie, [user("u"), asst("a"), user("v")], "b", { ...turn([1, 2, 7, 3], [4]), finishReason: "length" });
    const [t] = exportTrajectories(trie);
    expect(t?.response_ids).toEqual([2, 7, 3, 4]);
    expect(t?.response_mask).toEqual([1, 0, 0, 1]);
    expect(t?.response_logprobs).toBeNull();
    // Exported on its own (all turns), the first reply ends with the token it stopped on.
    const first = exportTrajectories(trie, true).find((x) => x.num_turns === 1);
    expect(first?.response_ids).toEqual([2, 99]);
    expect(first?.response_mask).toEqual([1, 1]);
  });
});
