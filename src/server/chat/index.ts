// Chat-completions helpers: prompt rendering from chat templates and tool-call parsing of model output.

export {
  type ChatMessage,
  ChatTemplate,
  type ChatTool,
  FALLBACK_TEMPLATE,
  type OtherContentPart,
  type RenderOptions,
  strftime,
  TemplateError,
  type TemplateErrorKind,
  type TextContentPart,
} from "./template";
export {
  type ParsedToolCall,
  type ParseResult,
  parseToolCalls,
  type StreamDelta,
  type ToolCallFormat,
  type ToolCallOptions,
  ToolCallStream,
} from "./tools";
