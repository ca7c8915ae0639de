// POST /v1/completions: raw prompt in, text out (JSON or SSE).
import type { TokenLogprob } from "../../engine";
import { type ApiError, badRequest, errorBody } from "../errors";
import type { LocalRouting } from "../mesh";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import { CompletionLogprobs, responseFormatGrammar } from "../structured";
import { RoutedRun } from "./routed";
import { beginRequest, checkCommon, engineOf, generateOptions, observed, primed, sseResponse, type Usage, usageOf } from "./run";
import type { CompletionBodyT } from "./schema";

/** The checks a completions body passes before it is routed anywhere (400 naming the field). */
export function checkCompletionBody(body: CompletionBodyT): void {
  checkCommon(body);
  if (body.echo) throw badRequest("echo is not supported", "echo", "unsupported_value");
  // Converting it is checking it: an unsupported schema feature is a 400 naming its path before routing.
  responseFormatGrammar(body.response_format);
}

/** Handle a validated completions request. */
export async function completion(
  model: ServedModel,
  body: CompletionBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  onStreamError: (e: unknown) => ApiError,
  routing: LocalRouting | null = null,
): Promise<Response | object> {
  checkCompletionBody(body);
  const engine = engineOf(model);
  const prompt = typeof body.prompt === "string" ? body.prompt : (body.prompt[0] as string);
  // OpenAI's default for this endpoint is 16 tokens.
  const maxTokens = body.max_tokens ?? 16;
  const { id, created, startedAt, abort } = beginRequest("cmpl", signal);
  const routed = new RoutedRun(routing, model.id);
  const options = generateOptions(body, prompt, maxTokens, abort.signal, routed.completionMarks(prompt));
  if (body.logprobs != null) options.logprobs = body.logprobs;
  const grammar = responseFormatGrammar(body.response_format);
  if (grammar) options.grammar = grammar;
  const gen = engine.generate(options);
  // Legacy logprobs: per chunk, the tokens since the last chunk (text a stop string held back still had its tokens).
  const lp = body.logprobs != null ? new CompletionLogprobs(prompt) : null;
  let pending: TokenLogprob[] = [];
  const choice = (text: string, finish: string | null) => {
    const logprobs = lp ? lp.of(pending) : null;
    pending = [];
    return { text, index: 0, logprobs, finish_reason: finish };
  };

  if (!body.stream) {
    let text = "";
    let usage: Usage | null = null;
    let finish = "stop";
    for await (const e of observed(gen, metrics, startedAt, abort.signal, routed.hooks())) {
      if (e.kind === "text") {
        text += e.text;
        if (e.logprobs) pending.push(...e.logprobs);
      } else if (e.kind === "done") {
        usage = usageOf(e);
        finish = e.finishReason === "length" ? "length" : "stop";
      }
    }
    routed.continuation(engine, gen.id, model.id, prompt, text);
    return { id, object: "text_completion", created, model: body.model, choices: [choice(text, finish)], usage };
  }
  const includeUsage = body.stream_options?.include_usage === true;
  const events = await primed(observed(gen, metrics, startedAt, abort.signal, routed.hooks()));
  return sseResponse(
    abort,
    async (send) => {
      let text = "";
      for await (const e of events) {
        if (e.kind === "text" && e.logprobs) pending.push(...e.logprobs);
        if (e.kind === "text" && e.text.length > 0) {
          send({ id, object: "text_completion", created, model: body.model, choices: [choice(e.text, null)] });
          text += e.text;
        } else if (e.kind === "done") {
          if (e.finishReason !== "cancelled") routed.continuation(engine, gen.id, model.id, prompt, text);
          const finish = e.finishReason === "length" ? "length" : "stop";
          send({ id, object: "text_completion", created, model: body.model, choices: [choice("", finish)] });
          if (includeUsage) send({ id, object: "text_completion", created, model: body.model, choices: [], usage: usageOf(e) });
        }
      }
    },
    (e) => errorBody(onStreamError(e)),
  );
}
