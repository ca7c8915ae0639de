// A Responses request as the equivalent chat request: `instructions` becomes a
// system message, message items chat messages (text parts as text parts),
// consecutive assistant items (output_text messages and function_call items)
// one assistant message with `tool_calls` (call_id as the call's id),
// function_call_output items tool messages, function tools chat function tools,
// and `previous_response_id` prepends the stored conversation it names. Every
// check happens here, before anything is routed or stored: a 400 names the
// field (`input[2].call_id`), an unknown previous_response_id is a 404.
import { ApiError, badRequest } from "../errors";
import { checkChatBody } from "../openai/chat";
import { MAX_JSON_DEPTH, tooDeep } from "../openai/depth";
import type { ChatBodyT } from "../openai/schema";
import { SchemaError, schemaGrammar } from "../structured";
import type { ResponsesBodyT } from "./schema";
import type { ChatMessageT, ResponseStore, StoredResponse } from "./store";

type TextPart = { type: "text"; text: string };
type ToolCallT = NonNullable<ChatMessageT["tool_calls"]>[number];
type Item = Record<string, unknown>;

/** A checked Responses request. */
export interface ResponsesRequest {
  /** The whole conversation (instructions, the stored one it continues, its input) as a chat request. */
  chat: ChatBodyT;
  /** The chat messages this request's input adds (instructions excluded): what it adds to the stored conversation. */
  input: ChatMessageT[];
  /** The stored response it continues, when it names one. */
  prior: { id: string; stored: StoredResponse } | null;
}

const ROLES = new Set(["user", "assistant", "system", "developer"]);

function nonEmpty(v: unknown): v is string {
  return typeof v === "string" && v.length > 0;
}

/** Content parts as text: `input_text` / `output_text` parts (anything else is refused, naming the part). */
function textParts(parts: unknown[], at: string): TextPart[] {
  return parts.map((p, j) => {
    const here = `${at}[${j}]`;
    if (typeof p !== "object" || p === null || Array.isArray(p)) throw badRequest(`${here} must be a content part object`, here);
    const part = p as Item;
    if (part.type !== "input_text" && part.type !== "output_text") {
      const what = typeof part.type === "string" ? `'${part.type}' content parts are` : "content parts without a type are";
      throw badRequest(
        `${here}.type: ${what} not supported, only 'input_text' and 'output_text' (this server has no multimodal input)`,
        `${here}.type`,
      );
    }
    if (typeof part.text !== "string") throw badRequest(`${here}.text: a text part needs a string 'text'`, `${here}.text`);
    return { type: "text", text: part.text };
  });
}

/** One message item's content: a string, or text parts. */
function messageContent(item: Item, at: string): string | TextPart[] {
  const c = item.content;
  if (typeof c === "string") return c;
  if (Array.isArray(c)) return textParts(c, `${at}.content`);
  throw badRequest(`${at}.content: must be a string or an array of content parts`, `${at}.content`);
}

/** The ids of the calls a conversation made, so an output can be matched with its call. */
function callIds(messages: readonly ChatMessageT[], into: Set<string>): void {
  for (const m of messages) for (const c of m.tool_calls ?? []) into.add(c.id);
}

/** Input items as chat messages, appended to `out`; `calls` holds the call ids made so far. */
function translateInput(input: ResponsesBodyT["input"], calls: Set<string>, out: ChatMessageT[]): void {
  if (typeof input === "string") {
    out.push({ role: "user", content: input });
    return;
  }
  // The assistant turn being assembled from consecutive assistant items: its text and its calls.
  let turn: { text: string | null; calls: ToolCallT[] } | null = null;
  const flush = () => {
    if (!turn) return;
    const content = turn.text ?? (turn.calls.length > 0 ? null : "");
    out.push({ role: "assistant", content, ...(turn.calls.length > 0 ? { tool_calls: turn.calls } : {}) });
    turn = null;
  };
  const assistant = () => {
    turn ??= { text: null, calls: [] };
    return turn;
  };
  (input as Item[]).forEach((item, i) => {
    const at = `input[${i}]`;
    const type = item.type ?? (item.role !== undefined ? "message" : undefined);
    if (type === "message") {
      if (typeof item.role !== "string" || !ROLES.has(item.role)) {
        throw badRequest(`${at}.role: must be one of user, assistant, system, developer`, `${at}.role`);
      }
      const content = messageContent(item, at);
      if (item.role === "assistant") {
        const t = assistant();
        t.text = (t.text ?? "") + (typeof content === "string" ? content : content.map((p) => p.text).join(""));
        return;
      }
      flush();
      out.push({ role: item.role as "user" | "system" | "developer", content });
    } else if (type === "function_call") {
      if (!nonEmpty(item.call_id))
        throw badRequest(`${at}.call_id: a function_call item needs a non-empty string call_id`, `${at}.call_id`);
      if (!nonEmpty(item.name)) throw badRequest(`${at}.name: a function_call item needs the function's name`, `${at}.name`);
      if (typeof item.arguments !== "string") {
        throw badRequest(`${at}.arguments: a function_call item's arguments must be a JSON string`, `${at}.arguments`);
      }
      assistant().calls.push({ id: item.call_id, type: "function", function: { name: item.name, arguments: item.arguments } });
      calls.add(item.call_id);
    } else if (type === "function_call_output") {
      flush();
      if (!nonEmpty(item.call_id)) {
        throw badRequest(`${at}.call_id: a function_call_output item needs the call_id of its function_call`, `${at}.call_id`);
      }
      if (!calls.has(item.call_id)) {
        throw badRequest(
          `${at}.call_id: no function_call with call_id '${item.call_id}' comes before this output in the conversation`,
          `${at}.call_id`,
        );
      }
      const o = item.output;
      let content: string | TextPart[];
      if (typeof o === "string") content = o;
      else if (Array.isArray(o)) content = textParts(o, `${at}.output`);
      else throw badRequest(`${at}.output: must be a string or an array of input_text parts`, `${at}.output`);
      out.push({ role: "tool", tool_call_id: item.call_id, content });
    } else if (type === "reasoning") {
      // Reasoning another model produced is dropped, as a model without reasoning would not see it.
    } else {
      const what = typeof type === "string" ? `'${type}' items are` : "items without a type are";
      throw badRequest(
        `${at}.type: ${what} not supported here, only 'message', 'function_call' and 'function_call_output' items are`,
        `${at}.type`,
      );
    }
  });
  flush();
}

/** Function tools in the Responses shape as chat tools. */
function translateTools(tools: NonNullable<ResponsesBodyT["tools"]>): NonNullable<ChatBodyT["tools"]> {
  return tools.map((tool, i) => {
    const at = `tools[${i}]`;
    const t = tool as Item;
    if (t.type !== "function") {
      throw badRequest(
        `${at}.type: '${t.type}' tools are not supported here, only function tools are (built-in tools run on OpenAI's servers)`,
        `${at}.type`,
      );
    }
    if (!nonEmpty(t.name)) throw badRequest(`${at}.name: a function tool needs a non-empty string name`, `${at}.name`);
    if (t.description !== undefined && t.description !== null && typeof t.description !== "string") {
      throw badRequest(`${at}.description must be a string`, `${at}.description`);
    }
    const p = t.parameters;
    if (p !== undefined && p !== null && (typeof p !== "object" || Array.isArray(p))) {
      throw badRequest(`${at}.parameters must be a JSON schema object`, `${at}.parameters`);
    }
    const fn = {
      name: t.name,
      ...(typeof t.description === "string" ? { description: t.description } : {}),
      ...(p ? { parameters: p as Record<string, unknown> } : {}),
    };
    return { type: "function" as const, function: fn };
  });
}

/** tool_choice in the Responses shape as chat's. */
function translateToolChoice(choice: unknown): ChatBodyT["tool_choice"] {
  if (choice === "none" || choice === "auto" || choice === "required") return choice;
  if (typeof choice === "object" && choice !== null && (choice as Item).type === "function") {
    const name = (choice as Item).name;
    if (!nonEmpty(name)) throw badRequest("missing required parameter 'tool_choice.name'", "tool_choice.name");
    return { type: "function", function: { name } };
  }
  const type = typeof choice === "object" && choice !== null ? (choice as Item).type : undefined;
  if (typeof type === "string") {
    throw badRequest(
      `tool_choice.type: '${type}' is not supported here, only 'none', 'auto', 'required' or {"type": "function", "name": ...}`,
      "tool_choice.type",
      "unsupported_value",
    );
  }
  throw badRequest(`invalid 'tool_choice': must be 'none', 'auto', 'required' or {"type": "function", "name": ...}`, "tool_choice");
}

/** Fields of the Responses API that change what a response is and that this server does not do: refused, not ignored. */
function refuseUnsupported(body: Item): void {
  const unsupported = (field: string, why: string) => badRequest(`${field} is not supported: ${why}`, field, "unsupported_value");
  if (body.background === true) throw unsupported("background", "responses run while the request is open");
  if (body.conversation !== undefined && body.conversation !== null) {
    throw unsupported("conversation", "there is no Conversations API here; chain responses with previous_response_id");
  }
  if (body.prompt !== undefined && body.prompt !== null) throw unsupported("prompt", "there are no stored prompt templates here");
}

/**
 * `text.format` as the equivalent chat response_format: `json_object`, or `json_schema` (flat here:
 * `name`, `schema`, `strict`), its schema checked here so a 400 names the Responses field.
 */
function textFormat(text: unknown): ChatBodyT["response_format"] {
  if (text === undefined || text === null) return undefined;
  if (typeof text !== "object" || Array.isArray(text)) throw badRequest("text must be an object", "text");
  const format = (text as { format?: unknown }).format;
  if (format === undefined || format === null) return undefined;
  const f = format as { type?: unknown; name?: unknown; schema?: unknown; strict?: unknown };
  if (typeof format !== "object" || Array.isArray(format)) throw badRequest("text.format must be an object", "text.format");
  if (f.type === "text") return undefined;
  if (f.type === "json_object") return { type: "json_object" };
  if (f.type !== "json_schema") {
    throw badRequest("text.format.type: must be 'text', 'json_object' or 'json_schema'", "text.format.type");
  }
  if (f.schema === null || typeof f.schema !== "object" || Array.isArray(f.schema)) {
    throw badRequest("text.format.schema: must be a JSON schema object", "text.format.schema");
  }
  if (f.name !== undefined && (typeof f.name !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(f.name))) {
    throw badRequest("text.format.name: 1 to 64 letters, digits, '_' or '-'", "text.format.name");
  }
  try {
    schemaGrammar(f.schema, "text.format.schema");
  } catch (e) {
    if (e instanceof SchemaError) throw badRequest(e.message, e.path);
    throw e;
  }
  const name = typeof f.name === "string" ? f.name : "output";
  return { type: "json_schema", json_schema: { name, schema: f.schema as Record<string, unknown>, strict: f.strict !== false } };
}

/** Refuse free-form JSON nested too deeply to translate or render (400 naming the field). */
function checkDepth(body: ResponsesBodyT): void {
  const deep = tooDeep(body.tools, "tools") ?? tooDeep(body.tool_choice, "tool_choice") ?? tooDeep(body.input, "input");
  if (deep) {
    const field = deep.split(/[.[]/, 1)[0] ?? "input";
    const where = deep.length > 160 ? `${deep.slice(0, 160)}...` : deep;
    throw badRequest(`${where} is nested deeper than ${MAX_JSON_DEPTH} levels`, field);
  }
}

/** 404 for a previous_response_id this node does not hold, in OpenAI's words. */
export function previousNotFound(id: string): ApiError {
  return new ApiError(
    404,
    "invalid_request_error",
    `Previous response with id '${id}' not found.`,
    "previous_response_id",
    "previous_response_not_found",
  );
}

/** A Responses body as the equivalent chat request, checked as chat checks it: every 400 (and the 404 of an unknown previous response) comes before routing. */
export function checkResponsesBody(body: ResponsesBodyT, store: ResponseStore): ResponsesRequest {
  refuseUnsupported(body as Item);
  checkDepth(body);
  for (const key of Object.keys(body.metadata ?? {})) {
    if (key.length > 64) throw badRequest(`metadata keys are at most 64 characters; '${key.slice(0, 80)}' is longer`, "metadata");
  }
  let prior: ResponsesRequest["prior"] = null;
  if (body.previous_response_id) {
    const stored = store.peek(body.previous_response_id);
    if (!stored) throw previousNotFound(body.previous_response_id);
    prior = { id: body.previous_response_id, stored };
  }
  const calls = new Set<string>();
  if (prior) callIds(prior.stored.conversation, calls);
  const input: ChatMessageT[] = [];
  translateInput(body.input, calls, input);
  // Instructions are not part of the stored conversation: each request gives its own (or none), as in OpenAI's API.
  const head: ChatMessageT[] = body.instructions ? [{ role: "system", content: body.instructions }] : [];
  const messages = head.concat(prior?.stored.conversation ?? [], input);
  const chat: ChatBodyT = { model: body.model, messages };
  if (body.tools && body.tools.length > 0) chat.tools = translateTools(body.tools);
  if (body.tool_choice !== undefined && body.tool_choice !== null) chat.tool_choice = translateToolChoice(body.tool_choice);
  if (body.max_output_tokens != null) chat.max_tokens = body.max_output_tokens;
  if (body.temperature != null) chat.temperature = body.temperature;
  if (body.top_p != null) chat.top_p = body.top_p;
  const format = textFormat((body as Item).text);
  if (format) chat.response_format = format;
  checkChatBody(chat);
  return { chat, input, prior };
}
