// JSON schemas of the request bodies. Fastify validates every body against them before a handler
// runs (ajv, no type coercion, unknown properties kept so that they are refused).
//
// Unknown parameters are refused with 400, not ignored: a parameter the server silently dropped
// (response_format, best_of, ...) would change what the client believes it asked for, and an
// answer that is reproducible but not the one asked for is no use. Parameters of the OpenAI API
// that detinfer does not implement are accepted only at their neutral value.
// Each property's `description` is the "<what>" of the error message "Expected <what> for <param>".

import { MAX_TOP_LOGPROBS } from '../model/output-head.js'
import { MAX_LOGIT_BIAS } from '../sampling.js'

/** Seeds as vLLM takes them (64-bit), within what a JSON number holds exactly. */
const MAX_SEED = Number.MAX_SAFE_INTEGER
export const MAX_N = 16
export const MAX_STOP = 4

const nullable = (type: string) => [type, 'null']

const maxTokens = { type: nullable('integer'), minimum: 1, description: 'integer of at least 1 or null' }

/** Parameters both endpoints share. */
const sampling = {
  model: { type: 'string', description: 'string naming the served model (see GET /v1/models)' },
  max_tokens: maxTokens,
  temperature: { type: nullable('number'), minimum: 0, maximum: 2, description: 'number between 0 and 2 or null' },
  top_p: { type: nullable('number'), exclusiveMinimum: 0, maximum: 1, description: 'number greater than 0 and at most 1 or null' },
  top_k: { type: nullable('integer'), minimum: -1, description: 'integer of at least -1 (-1 or 0: no limit) or null' },
  min_p: { type: nullable('number'), minimum: 0, maximum: 1, description: 'number between 0 and 1 or null' },
  seed: { type: nullable('integer'), minimum: -MAX_SEED, maximum: MAX_SEED, description: `integer between -${MAX_SEED} and ${MAX_SEED} or null` },
  stop: {
    description: `non-empty string or array of at most ${MAX_STOP} non-empty strings or null`,
    anyOf: [
      { type: 'string', minLength: 1 },
      { type: 'array', items: { type: 'string', minLength: 1 }, maxItems: MAX_STOP },
      { type: 'null' },
    ],
  },
  n: { type: nullable('integer'), minimum: 1, maximum: MAX_N, description: `integer between 1 and ${MAX_N} or null` },
  stream: { type: nullable('boolean'), description: 'boolean or null' },
  stream_options: {
    type: nullable('object'),
    description: 'object {include_usage: boolean} or null',
    additionalProperties: false,
    properties: { include_usage: { type: nullable('boolean'), description: 'boolean or null' } },
  },
  user: { type: nullable('string'), description: 'string or null' },
  // vLLM's extensions: ids that end a choice besides EOS, and going on past EOS (fixed-length benchmarks).
  stop_token_ids: { type: nullable('array'), items: { type: 'integer', minimum: 0 }, maxItems: 1024, description: 'array of at most 1024 token ids or null' },
  ignore_eos: { type: nullable('boolean'), description: 'boolean or null' },
  // Applied on the device before every choice (README, "Penalties and logit bias"); the handler
  // checks logit_bias's keys against the vocabulary.
  frequency_penalty: { type: nullable('number'), minimum: -2, maximum: 2, description: 'number between -2 and 2 or null' },
  presence_penalty: { type: nullable('number'), minimum: -2, maximum: 2, description: 'number between -2 and 2 or null' },
  // vLLM's extension (transformers' repetition_penalty): 1 is none.
  repetition_penalty: { type: nullable('number'), exclusiveMinimum: 0, maximum: 2, description: 'number greater than 0 and at most 2 or null' },
  logit_bias: {
    type: nullable('object'),
    maxProperties: MAX_LOGIT_BIAS,
    additionalProperties: { type: 'number', minimum: -100, maximum: 100, description: 'number between -100 and 100' },
    description: `object of at most ${MAX_LOGIT_BIAS} token ids to biases between -100 and 100, or null`,
  },
  // vLLM's structured outputs: one of a JSON schema (an object, or its JSON text), a regular
  // expression, a choice of strings, an EBNF grammar (xgrammar's syntax), a structural tag (its
  // JSON text, as vLLM takes it; the handler reads it) or JSON mode.
  structured_outputs: {
    type: nullable('object'),
    additionalProperties: false,
    properties: {
      json: { type: ['object', 'boolean', 'string', 'null'] },
      regex: { type: nullable('string'), minLength: 1 },
      choice: { type: nullable('array'), items: { type: 'string', minLength: 1 }, minItems: 1 },
      grammar: { type: nullable('string'), minLength: 1 },
      structural_tag: {
        type: nullable('string'),
        minLength: 1,
        description: 'JSON text of a structural tag ({"type": "structural_tag", "format": {...}} or {"structures": [...], "triggers": [...]}) or null',
      },
      json_object: { type: nullable('boolean') },
    },
    description: 'object with one of json (a JSON schema), regex, choice (non-empty strings), grammar (EBNF), structural_tag (its JSON text) or json_object: true, or null',
  },
  // Structured output, as OpenAI's chat API and vLLM's two endpoints take it (README, "Structured
  // output"); the handler builds the schema's grammar and refuses one it cannot. A structural tag
  // as vLLM takes one: xgrammar's {type, format}, or the older {type, structures, triggers}.
  response_format: {
    description:
      "{type: 'text'}, {type: 'json_object'}, {type: 'json_schema', json_schema: {name, description, schema, strict}}, " +
      "{type: 'structural_tag', format}, {type: 'structural_tag', structures: [{begin, schema, end}], triggers} or null",
    anyOf: [
      { type: 'null' },
      { type: 'object', additionalProperties: false, required: ['type'], properties: { type: { enum: ['text', 'json_object'] } } },
      { type: 'object', additionalProperties: false, required: ['type', 'format'], properties: { type: { const: 'structural_tag' }, format: { type: 'object' } } },
      {
        type: 'object',
        additionalProperties: false,
        required: ['type', 'structures', 'triggers'],
        properties: {
          type: { const: 'structural_tag' },
          structures: {
            type: 'array',
            items: {
              type: 'object',
              additionalProperties: false,
              required: ['begin', 'schema', 'end'],
              properties: { begin: { type: 'string' }, schema: { type: 'object' }, end: { type: 'string' } },
            },
          },
          triggers: { type: 'array', items: { type: 'string' } },
        },
      },
      {
        type: 'object',
        additionalProperties: false,
        required: ['type', 'json_schema'],
        properties: {
          type: { const: 'json_schema' },
          json_schema: {
            type: 'object',
            additionalProperties: false,
            required: ['name'],
            properties: {
              name: { type: 'string', pattern: '^[a-zA-Z0-9_-]{1,64}$' },
              description: { type: nullable('string') },
              schema: { type: ['object', 'boolean', 'null'] },
              strict: { type: nullable('boolean') },
            },
          },
        },
      },
    ],
  },
}

const tokenIds = { type: 'array', items: { type: 'integer', minimum: 0 }, minItems: 1 }

export const completionBody = {
  type: 'object',
  description: 'JSON object',
  additionalProperties: false,
  required: ['model', 'prompt'],
  properties: {
    ...sampling,
    prompt: {
      description: 'string, array of strings, array of token ids or array of arrays of token ids',
      anyOf: [
        { type: 'string' },
        { type: 'array', items: { type: 'string' }, minItems: 1 },
        tokenIds,
        { type: 'array', items: tokenIds, minItems: 1 },
      ],
    },
    logprobs: { type: nullable('integer'), minimum: 0, maximum: MAX_TOP_LOGPROBS, description: `integer between 0 and ${MAX_TOP_LOGPROBS} or null` },
    echo: { type: nullable('boolean'), description: 'boolean or null' },
    // 0 asks for the prompt's log-probs alone, with echo (the handler refuses it without).
    max_tokens: { type: nullable('integer'), minimum: 0, description: 'integer of at least 0 (0 only with echo: true) or null' },
    best_of: { enum: [1, null], description: '1 or null (best_of is not supported)' },
    suffix: { enum: [null], description: 'null (suffix is not supported)' },
  },
} as const

const toolName = { type: 'string', pattern: '^[a-zA-Z0-9_-]{1,64}$', description: 'name of 1 to 64 letters, digits, underscores and dashes' }

/** A call of an earlier assistant message, as the OpenAI API gives it back. */
const messageToolCall = {
  type: 'object',
  additionalProperties: false,
  required: ['id', 'type', 'function'],
  description: 'tool call {id, type: "function", function: {name, arguments}}',
  properties: {
    id: { type: 'string', description: 'string' },
    type: { const: 'function', description: "'function'" },
    function: {
      type: 'object',
      additionalProperties: false,
      required: ['name', 'arguments'],
      description: 'function call {name, arguments}',
      properties: { name: { type: 'string', description: 'string' }, arguments: { type: 'string', description: 'string (the arguments as JSON)' } },
    },
  },
}

const textPart = {
  type: 'object',
  additionalProperties: false,
  required: ['type', 'text'],
  description: 'text part {type: "text", text}',
  properties: { type: { const: 'text', description: "'text' (only text parts are supported)" }, text: { type: 'string', description: 'string' } },
}

const message = {
  type: 'object',
  additionalProperties: false,
  // content may be left out of an assistant message with tool_calls, as OpenAI's API and vLLM
  // allow; the handler refuses it missing elsewhere.
  required: ['role'],
  description: 'chat message {role, content}',
  properties: {
    role: { enum: ['system', 'developer', 'user', 'assistant', 'tool'], description: "one of 'system', 'developer', 'user', 'assistant', 'tool'" },
    content: {
      description: 'string, array of text parts {type: "text", text} or null',
      anyOf: [{ type: 'string' }, { type: 'array', items: textPart }, { type: 'null' }],
    },
    // Refused with its own message by the handler (a chat template has no place for it).
    name: { type: 'string', description: 'string' },
    tool_call_id: { type: nullable('string'), description: 'string or null' },
    // An assistant's earlier calls (the handler refuses them on other roles).
    tool_calls: { type: nullable('array'), items: messageToolCall, description: 'array of tool calls {id, type: "function", function: {name, arguments}} or null' },
    // What the openai client's helpers (stream, runTools) leave in the assistant messages they
    // return and send back.
    refusal: { enum: [null], description: 'null (refusals are not supported)' },
    parsed: { enum: [null], description: 'null (structured output is not supported)' },
    // What the Python client's message.model_dump() leaves in an assistant message it returned
    // (OpenAI's deprecated function_call and audio, at their neutral values).
    function_call: { enum: [null], description: 'null (function_call is deprecated: use tool_calls)' },
    audio: { enum: [null], description: 'null (audio is not supported)' },
    annotations: { type: nullable('array'), maxItems: 0, description: 'null or an empty array (annotations are not supported)' },
  },
}

/** A tool the model may call, as OpenAI's API takes it. */
const tool = {
  type: 'object',
  additionalProperties: false,
  required: ['type', 'function'],
  description: 'tool {type: "function", function: {name, description, parameters}}',
  properties: {
    type: { const: 'function', description: "'function'" },
    function: {
      type: 'object',
      additionalProperties: false,
      required: ['name'],
      description: 'function {name, description, parameters}',
      properties: {
        name: toolName,
        description: { type: nullable('string'), description: 'string or null' },
        parameters: { type: nullable('object'), description: 'JSON Schema object or null' },
        // The calls the model makes are held to the parameters by a grammar, in --tool-call-parser's format (the handler).
        strict: { type: nullable('boolean'), description: 'boolean or null' },
      },
    },
  },
}

export const chatCompletionBody = {
  type: 'object',
  description: 'JSON object',
  additionalProperties: false,
  required: ['model', 'messages'],
  properties: {
    ...sampling,
    messages: { type: 'array', items: message, minItems: 1, description: 'non-empty array of chat messages {role, content}' },
    max_completion_tokens: maxTokens,
    logprobs: { type: nullable('boolean'), description: 'boolean or null' },
    top_logprobs: {
      type: nullable('integer'),
      minimum: 0,
      maximum: MAX_TOP_LOGPROBS,
      description: `integer between 0 and ${MAX_TOP_LOGPROBS} or null`,
    },
    // vLLM's extension: variables for the chat template (Qwen3's enable_thinking, for instance).
    chat_template_kwargs: { type: nullable('object'), description: 'object of chat template variables or null' },
    // vLLM's extensions: the prompt ends inside the last (assistant) message, which the answer continues.
    add_generation_prompt: { type: nullable('boolean'), description: 'boolean or null (false only with continue_final_message)' },
    continue_final_message: { type: nullable('boolean'), description: 'boolean or null' },
    tools: { type: nullable('array'), items: tool, description: 'array of tools {type: "function", function: {name, description, parameters}} or null' },
    // The handler refuses 'required' and a named function (constrained decoding) with their own message.
    tool_choice: {
      description: "'none', 'auto', 'required', a named function {type: 'function', function: {name}} or null",
      anyOf: [{ enum: ['none', 'auto', 'required', null] }, { type: 'object' }],
    },
    parallel_tool_calls: { type: nullable('boolean'), description: 'boolean or null' },
  },
} as const

/**
 * POST /tokenize, as vLLM serves it (lm-evaluation-harness's remote tokenizer calls it): a text
 * (`prompt`, special tokens added unless add_special_tokens is false) or a conversation
 * (`messages`, through the chat template up to the assistant's turn). The handler requires exactly one.
 */
export const tokenizeBody = {
  type: 'object',
  description: 'JSON object',
  additionalProperties: false,
  properties: {
    model: { type: 'string', description: 'string naming the served model (see GET /v1/models)' },
    prompt: { type: 'string', description: 'string' },
    messages: { type: 'array', items: message, minItems: 1, description: 'non-empty array of chat messages {role, content}' },
    tools: { type: nullable('array'), items: tool, description: 'array of tools {type: "function", function: {name, description, parameters}} or null' },
    add_special_tokens: { type: nullable('boolean'), description: 'boolean or null' },
    add_generation_prompt: { type: nullable('boolean'), description: 'boolean or null (false only with continue_final_message)' },
    continue_final_message: { type: nullable('boolean'), description: 'boolean or null' },
    chat_template_kwargs: { type: nullable('object'), description: 'object of chat template variables or null' },
    return_token_strs: { enum: [false, null], description: 'false or null (token strings are not returned)' },
  },
} as const

/** POST /detokenize: token ids to text, special tokens left out (as completions give text). */
export const detokenizeBody = {
  type: 'object',
  description: 'JSON object',
  additionalProperties: false,
  required: ['tokens'],
  properties: {
    model: { type: 'string', description: 'string naming the served model (see GET /v1/models)' },
    tokens: { type: 'array', items: { type: 'integer', minimum: 0 }, description: 'array of token ids' },
  },
} as const

/** Request bodies as the handlers see them once the schemas have passed them. */
export interface SamplingBody {
  model: string
  max_tokens?: number | null
  temperature?: number | null
  top_p?: number | null
  top_k?: number | null
  min_p?: number | null
  seed?: number | null
  stop?: string | string[] | null
  n?: number | null
  stream?: boolean | null
  stream_options?: { include_usage?: boolean | null } | null
  user?: string | null
  stop_token_ids?: number[] | null
  ignore_eos?: boolean | null
  frequency_penalty?: number | null
  presence_penalty?: number | null
  repetition_penalty?: number | null
  logit_bias?: Record<string, number> | null
  response_format?: ResponseFormatBody | null
  structured_outputs?: StructuredOutputsBody | null
}

export interface StructuredOutputsBody {
  json?: Record<string, unknown> | boolean | string | null
  regex?: string | null
  choice?: string[] | null
  grammar?: string | null
  /** JSON text of a structural tag (StructuralTagBody), as vLLM takes it. */
  structural_tag?: string | null
  json_object?: boolean | null
}

/** A structural tag as vLLM takes one: xgrammar's {format}, or the older {structures, triggers}. */
export type StructuralTagBody =
  | { type?: 'structural_tag'; format: Record<string, unknown> }
  | { type?: 'structural_tag'; structures: { begin: string; schema: Record<string, unknown>; end: string }[]; triggers: string[] }

export type ResponseFormatBody =
  | { type: 'text' | 'json_object' }
  | { type: 'json_schema'; json_schema: { name: string; description?: string | null; schema?: Record<string, unknown> | boolean | null; strict?: boolean | null } }
  | (StructuralTagBody & { type: 'structural_tag' })

export interface CompletionBody extends SamplingBody {
  prompt: string | string[] | number[] | number[][]
  logprobs?: number | null
  echo?: boolean | null
}

export interface ToolBody {
  type: 'function'
  function: { name: string; description?: string | null; parameters?: Record<string, unknown> | null; strict?: boolean | null }
}

export interface TokenizeBody {
  model?: string
  prompt?: string
  messages?: ChatMessageBody[]
  tools?: ToolBody[] | null
  chat_template_kwargs?: Record<string, unknown> | null
  add_special_tokens?: boolean | null
  add_generation_prompt?: boolean | null
  continue_final_message?: boolean | null
}

export interface DetokenizeBody {
  model?: string
  tokens: number[]
}

export interface ChatMessageBody {
  role: string
  /** Left out only of an assistant message with tool_calls (the handler checks). */
  content?: string | { type: 'text'; text: string }[] | null
  name?: string
  tool_call_id?: string | null
  tool_calls?: { id: string; type: 'function'; function: { name: string; arguments: string } }[] | null
  refusal?: null
  parsed?: null
  function_call?: null
  audio?: null
  annotations?: [] | null
}

export interface ChatCompletionBody extends SamplingBody {
  messages: ChatMessageBody[]
  add_generation_prompt?: boolean | null
  continue_final_message?: boolean | null
  chat_template_kwargs?: Record<string, unknown> | null
  tools?: ToolBody[] | null
  tool_choice?: 'none' | 'auto' | 'required' | Record<string, unknown> | null
  parallel_tool_calls?: boolean | null
  max_completion_tokens?: number | null
  logprobs?: boolean | null
  top_logprobs?: number | null
}
