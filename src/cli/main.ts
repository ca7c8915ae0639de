#!/usr/bin/env bun
// The `mesh` command line: parses, runs a command, prints, exits.
import { Command, CommanderError, Option } from "commander";
import { DEFAULT_ATTN_KERNEL, DEFAULT_PLAIN_ATTN } from "../engine/attention";
import { CHECKPOINT_DEFAULTS } from "../engine/checkpoints";
import { HOST_CACHE_DEFAULT_MIB } from "../engine/index";
import { LANE_DEFAULTS } from "../hydration/lanes";
import { RESPONSE_STORE_DEFAULT_MIB } from "../server/responses/store";
import { SESSION_DEFAULTS } from "../sessions";
import { DEFAULT_MAX_RTT_MS } from "../split/plan";
import { STAGE_CACHE_DEFAULT_MIB } from "../split/stage-node";
import { registerBench } from "./bench";
import { buildInfo, formatBuildInfo } from "./build-info";
import { invite } from "./invite";
import { models } from "./models";
import { peers } from "./peers";
import { pull } from "./pull";
import { serve } from "./serve";
import { attnKernelOption, intOption, onOffOption, plainAttnOption, UsageError } from "./usage";

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

/** Build the commander program (exported for tests). */
export function program(): Command {
  const p = new Command("mesh")
    .description("One executable that pools machines into a single OpenAI-compatible LLM inference mesh.")
    .version(formatBuildInfo(buildInfo()).trimEnd(), "-V, --version", "print the version, llama.cpp commit, backend and build flags")
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  p.command("serve")
    .description("serve a GGUF model over an OpenAI-compatible HTTP API")
    .option(
      "-m, --model <path|name>",
      "GGUF model file, or the name of a model a member of the mesh serves (pulled from its holders into <state dir>/models; default: a built-in demo model with random weights)",
    )
    .option("--alias <name>", "another model name requests may use for the model, e.g. gpt-4o (repeatable)", collect, [])
    .option("--host <addr>", "address to listen on (0.0.0.0 for all interfaces)", "127.0.0.1")
    .option("-p, --port <n>", "HTTP port", intOption("--port", 0, 65535), 9337)
    .option("-c, --ctx-size <n>", "KV cache size in tokens, shared by all slots", intOption("--ctx-size", 64, 1 << 24), 16384)
    .option("-n, --parallel <n>", "requests decoded at once (slots)", intOption("--parallel", 1, 256), 4)
    .option("-t, --threads <n>", "CPU threads (default: all cores)", intOption("--threads", 1, 1024))
    .option("-b, --batch-size <n>", "most tokens in one decode step", intOption("--batch-size", 32, 65536), 2048)
    .option(
      "--attn-kernel <mesh|ggml>",
      "CPU flash-attention kernel: mesh (default: one sequence's batch of 2+ new tokens, e.g. an agent's next turn over a long cached prompt, 1.3-3.9x ggml's) or ggml (llama.cpp's own for every decode); a model whose attention mesh's does not compute (head sizes, ALiBi, soft-capping, sinks) runs ggml's; GPU layers keep their backend's",
      attnKernelOption,
      DEFAULT_ATTN_KERNEL,
    )
    .option(
      "--plain-attn <min:max|off>",
      `decodes of MIN to MAX new tokens compute attention as two matrix products instead of flash attention; CPU-only models, capped so the extra memory stays under half the KV cache's (default: off with the mesh kernel, which is faster, ${DEFAULT_PLAIN_ATTN.min}:${DEFAULT_PLAIN_ATTN.max} with ggml's)`,
      plainAttnOption,
    )
    .option(
      "--n-gpu-layers <n>",
      "layers to offload to GPUs (-1 = all that fit in free GPU memory, 0 = none; a count that does not fit is refused)",
      intOption("--n-gpu-layers", -1, 100000),
      -1,
    )
    .option(
      "--queue-capacity <n>",
      "requests that may wait for a slot and KV room; beyond it: 429 with Retry-After",
      intOption("--queue-capacity", 0, 100000),
      64,
    )
    .option("--queue-timeout <s>", "seconds a request may wait in the queue before 429", intOption("--queue-timeout", 1, 86400), 120)
    .option(
      "--kv-reserve-output <n>",
      "output tokens reserved in KV for a request without max_tokens (it may grow past it into free room)",
      intOption("--kv-reserve-output", 1, 1 << 20),
      512,
    )
    .option(
      "--cache-ram <MiB>",
      "host RAM for idle conversations' KV state: moved out of the KV pool when other requests start, copied back when a prompt continues them (0 keeps them in the pool)",
      intOption("--cache-ram", 0, 1 << 24),
      HOST_CACHE_DEFAULT_MIB,
    )
    .option(
      "--idle-restore <on|off>",
      "copy the conversation another request moved to host RAM back into the KV pool once the engine has been idle a moment (at least 100 ms, ten times the copy), so its next turn finds it resident; the next request that does not continue it only clears it again",
      onOffOption("--idle-restore"),
      true,
    )
    .option(
      "--session-ttl <s>",
      "seconds an idle agent session (X-Session-Id) is kept with its trie and KV checkpoints",
      intOption("--session-ttl", 1, 365 * 86400),
      SESSION_DEFAULTS.ttlMs / 1000,
    )
    .option(
      "--sessions-max <n>",
      "sessions held at once; a new one past it gets 429",
      intOption("--sessions-max", 1, 1 << 20),
      SESSION_DEFAULTS.maxSessions,
    )
    .option(
      "--sessions-memory <MiB>",
      "memory for all sessions' messages and token ids together; past it new turns get 429",
      intOption("--sessions-memory", 1, 1 << 20),
      SESSION_DEFAULTS.maxTotalBytes / (1024 * 1024),
    )
    .option(
      "--checkpoint-ram <MiB>",
      "host RAM for sessions' KV checkpoints (the state at the end of each reply), kept apart from --cache-ram",
      intOption("--checkpoint-ram", 0, 1 << 24),
      CHECKPOINT_DEFAULTS.ramMiB,
    )
    .option(
      "--checkpoint-disk <MiB>",
      "disk under the state dir for checkpoints spilled from RAM (kept across restarts; 0: RAM only)",
      intOption("--checkpoint-disk", 0, 1 << 30),
      CHECKPOINT_DEFAULTS.diskMiB,
    )
    .option(
      "--hydrate-parallel <n>",
      "checkpoints of sessions routed here fetched from peers at once by the background pass after a (re)join (0: none; a request still fetches its own first)",
      intOption("--hydrate-parallel", 0, 64),
      LANE_DEFAULTS.parallelism,
    )
    .option(
      "--hydrate-timeout <s>",
      "seconds one checkpoint fetch from a peer may take before it is abandoned (the session then prefills in full or runs on its holder)",
      intOption("--hydrate-timeout", 1, 3600),
      LANE_DEFAULTS.itemTimeoutMs / 1000,
    )
    .option("--api-key <key>", "require 'Authorization: Bearer <key>' (repeatable)", collect, [])
    .option("--api-key-file <path>", "file with one API key per line")
    .option("--max-body-bytes <n>", "largest request body accepted (413 above)", intOption("--max-body-bytes", 1024), 8 * 1024 * 1024)
    .option(
      "--responses-store <MiB>",
      "memory for past /v1/responses answers that previous_response_id continues (least recently used dropped first; 0 keeps none)",
      intOption("--responses-store", 0, 1 << 20),
      RESPONSE_STORE_DEFAULT_MIB,
    )
    .option("--state-dir <dir>", "node key and mesh credentials (default: $MESH_STATE_DIR or ~/.local/share/mesh)")
    .option("--join <token|host:port>", "join a mesh: an invite token, or a member's host:port with --mesh-secret")
    .option("--mesh-secret <secret>", "the mesh secret (32+ characters) to create or join a mesh with")
    .option("--mesh-secret-file <path>", "file holding the mesh secret")
    .option("--advertise <host:port>", "address peers reach this node at (default: the listen address)")
    .option("--node-name <name>", "name shown in 'mesh peers' (default: the host name)")
    .addOption(
      new Option("--routing <policy>", "where requests run: the node holding their prompt prefix in KV cache, or the least loaded")
        .choices(["cache", "load"])
        .default("cache"),
    )
    .addOption(
      new Option(
        "--console <who>",
        "the web console at GET / and its admin API (/api/requests, /api/events): local = without --api-key only when listening on loopback; public = to anyone who reaches the node (with --api-key: anyone with a key); off",
      )
        .choices(["local", "public", "off"])
        .default("local"),
    )
    .option("--no-console", "turn the web console and its admin API off (as --console off)")
    .option(
      "--upload-limit <rate>",
      "bandwidth all uploads of model files to peers may use together, e.g. 500k, 20M, 1G bytes/s (default: no cap)",
    )
    .option(
      "--pull-wait <s>",
      "seconds --model <name> waits for a member of the mesh that has the model",
      intOption("--pull-wait", 1, 86400),
      120,
    )
    .option(
      "--file-chunk-size <bytes>",
      "chunk size this node cuts the model file it announces into (hashed and fetched per chunk)",
      intOption("--file-chunk-size", 4096, 256 * 1024 * 1024),
      4 * 1024 * 1024,
    )
    .addOption(new Option("--fault-corrupt-uploads", "test fault: flip a byte in every chunk uploaded").hideHelp())
    .option(
      "--split [how]",
      "split the model by layers over peers that offer stages: auto (the fewest nearest peers that hold it), N (nodes in all, this one included) or node,node (peer ids or id prefixes, in pipeline order)",
    )
    .option(
      "--split-max-rtt <ms>",
      "refuse stage peers whose tunnel round trip is longer (every token pays it once per stage)",
      intOption("--split-max-rtt", 1, 60_000),
      DEFAULT_MAX_RTT_MS,
    )
    .option("--split-wait <s>", "seconds --split waits for enough stage offers before giving up", intOption("--split-wait", 0, 3600), 60)
    .option(
      "--offer-stage",
      "lend this node's device (CPU or first GPU) to other nodes' split models, through the mesh's encrypted stage tunnel",
    )
    .option("--stage-memory <MiB>", "most memory --offer-stage lends (default: what is free)", intOption("--stage-memory", 1, 1 << 30))
    .option(
      "--stage-cache <MiB>",
      "disk under the state dir for weights heads sent with --offer-stage (oldest dropped first; 0: none)",
      intOption("--stage-cache", 0, 1 << 30),
      STAGE_CACHE_DEFAULT_MIB,
    )
    .option("--stage-port <n>", "port of the stage tunnel with --offer-stage (0: any free one)", intOption("--stage-port", 0, 65535), 0)
    .option("--shutdown-grace <s>", "seconds to let running requests finish on SIGINT/SIGTERM", intOption("--shutdown-grace", 0, 3600), 10)
    .addOption(
      new Option("--log-format <format>", "log lines as readable text or one JSON object each").choices(["text", "json"]).default("text"),
    )
    .addHelpText(
      "after",
      `
Examples:
  mesh serve                                   # built-in demo model (random weights) on http://127.0.0.1:9337
  mesh serve --model ./qwen2.5-7b-q4_k_m.gguf --ctx-size 32768 --parallel 8
  mesh serve -m model.gguf --host 0.0.0.0 --api-key "$KEY" --log-format json
  mesh serve -m other.gguf --host 0.0.0.0 --join <token printed by the first node>
  mesh serve --model other --join <token>      # a model only a peer has: pulled from the mesh (verified, resumable), then served
  mesh serve -m big.gguf --upload-limit 50M    # peers pull this node's file at most 50 MiB/s in all
  mesh serve --host 0.0.0.0 --api-key "$KEY" --console public   # the console for anyone with the key
  mesh serve -m small.gguf --host 0.0.0.0 --join <token> --offer-stage --stage-memory 8192   # lend 8 GiB to split models
  mesh serve -m big.gguf --host 0.0.0.0 --join <token> --split             # run big.gguf over this node and stage peers

Then:
  curl http://127.0.0.1:9337/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "<id from /v1/models>", "messages": [{"role": "user", "content": "Hello"}]}'
  open http://127.0.0.1:9337/ in a browser: the mesh console (members, requests and why they went where, cache, chat)`,
    )
    .action(async (opts) => {
      process.exitCode = await serve(opts);
    });

  registerBench(p);

  const nodeFlags = (c: Command) =>
    c
      .option("--url <url>", "the node to ask (default: the one using the state dir, else http://127.0.0.1:9337)")
      .option("--state-dir <dir>", "where the node keeps its mesh credentials (default: $MESH_STATE_DIR or ~/.local/share/mesh)");

  nodeFlags(p.command("peers").description("list the mesh's members, what they serve and how loaded they are"))
    .option("--api-key <key>", "authenticate with an inference API key instead of the state dir's mesh credentials")
    .option("--json", "one JSON object (per refresh) instead of a table")
    .option("--watch [seconds]", "refresh every few seconds (default 2) until interrupted")
    .addHelpText("after", "\nExamples:\n  mesh peers\n  mesh peers --watch\n  mesh peers --url http://10.0.0.2:9337 --json")
    .action(async (opts) => {
      process.exitCode = await peers(opts);
    });

  nodeFlags(
    p
      .command("models")
      .description("list the model files of this node and of the mesh: where each lives, size, BLAKE3 hash, pull progress"),
  )
    .option("--api-key <key>", "authenticate with an inference API key instead of the state dir's mesh credentials")
    .option("--json", "one JSON object instead of a table")
    .addHelpText("after", "\nExamples:\n  mesh models\n  mesh models --json | jq '.mesh[].name'")
    .action(async (opts) => {
      process.exitCode = await models(opts);
    });

  nodeFlags(
    p
      .command("pull")
      .argument("<name>", "the model's name (or alias, or file name) as 'mesh models' lists it")
      .description("fetch a model file from the members that have it (parallel, verified, resumable), without serving it"),
  )
    .option("--dir <dir>", "folder to put the file in (default: <state dir>/models, where 'mesh serve --model <name>' looks)")
    .option("--from <member>", "ask only this member (name or node id) for the file; repeatable (default: every holder)", collect, [])
    .option("--json", "progress and the result as JSON lines on stdout")
    .addHelpText(
      "after",
      "\nExamples:\n  mesh pull qwen2.5-7b-q4_k_m        # then: mesh serve --model qwen2.5-7b-q4_k_m\n  mesh pull qwen2.5-7b-q4_k_m --dir ./models --json",
    )
    .action(async (name: string, opts) => {
      process.exitCode = await pull(name, opts);
    });

  p.command("version")
    .description("print the version, llama.cpp release and commit, backend and build flags (as mesh --version)")
    .option("--json", "one JSON object instead of lines")
    .action((opts: { json?: boolean }) => {
      const b = buildInfo();
      process.stdout.write(opts.json ? `${JSON.stringify(b)}\n` : formatBuildInfo(b));
    });

  nodeFlags(p.command("invite").description("print the token another machine joins this node's mesh with"))
    .addHelpText("after", "\nExample:\n  mesh serve --join $(mesh invite)     # on the other machine, with the printed token")
    .action(async (opts) => {
      process.exitCode = await invite(opts);
    });

  p.addHelpText(
    "after",
    `
Examples:
  mesh serve                      # serve the built-in demo model
  mesh serve --model ./model.gguf # serve a real GGUF model
  mesh serve --join <token>       # join the mesh of the node that printed the token
  mesh peers                      # members of the mesh, their models and load
  mesh models                     # model files in the mesh: where, size, hash, pull progress
  mesh serve --model <name> --join <token>  # serve a model a peer has: pulled from the peers first
  mesh serve --help               # every serve option
  mesh bench kv-pressure --tiny   # overlapping agent loops against a node it starts`,
  );
  return p;
}

/** Run the CLI with argv; bad input prints one line and exits 2. */
export async function main(argv: string[]): Promise<void> {
  try {
    await program().parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version exit 0 after printing; commander already printed any error line.
      process.exit(e.exitCode === 0 ? 0 : 2);
    }
    if (e instanceof UsageError) {
      process.stderr.write(`mesh: ${e.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`mesh: ${(e as Error)?.message ?? String(e)}\n`);
    process.exit(1);
  }
}

if (import.meta.main) await main(process.argv);
