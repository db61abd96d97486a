// Errors as the OpenAI API returns them: an HTTP status and {error: {message, type, param, code}}.
// Every failure a client can see goes through here; a stack trace never reaches a response body.
import type { FastifyError } from 'fastify'
import { describeValue } from '../errors.js'

export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null }
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    /** Extra response headers (Retry-After on 429). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message)
    this.name = 'ApiError'
  }

  body(): OpenAiErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

export const invalidRequest = (message: string, param: string | null = null, code: string | null = null) =>
  new ApiError(400, message, 'invalid_request_error', param, code)

export const contextLengthExceeded = (message: string, param = 'messages') =>
  new ApiError(400, message, 'invalid_request_error', param, 'context_length_exceeded')

export const overloaded = (message: string, retryAfterSeconds: number) =>
  new ApiError(429, message, 'rate_limit_error', null, 'queue_full', { 'retry-after': String(retryAfterSeconds) })

export const unavailable = (message: string, code: string) => new ApiError(503, message, 'service_unavailable', null, code)

/** One JSON-schema validation error (ajv with verbose: true), as Fastify hands it over. */
interface SchemaError {
  keyword: string
  instancePath: string
  params: Record<string, unknown>
  data?: unknown
  parentSchema?: { description?: string; properties?: Record<string, { description?: string }> }
  message?: string
}

/** "/messages/0/content" -> "messages[0].content" */
function paramName(instancePath: string, child?: string): string {
  const parts = instancePath.split('/').slice(1)
  if (child !== undefined) parts.push(child)
  return parts.map((p, i) => (/^\d+$/.test(p) ? `[${p}]` : i === 0 ? p : `.${p}`)).join('')
}

/**
 * The first schema violation as one message in the library's format ("Expected <what> for <param>
 * but received <value>"); the schemas put <what> in each property's description.
 */
export function schemaError(errors: SchemaError[]): ApiError {
  // ajv reports the branches of an anyOf before the anyOf itself, whose description says it all.
  const e = errors.find((x) => x.keyword === 'anyOf') ?? errors[0]!
  if (e.keyword === 'additionalProperties') {
    const name = paramName(e.instancePath, String(e.params['additionalProperty']))
    // An object accepted only at a neutral value (response_format) is named whole, with why.
    if (e.parentSchema?.description && /not supported/.test(e.parentSchema.description))
      return invalidRequest(`Expected ${e.parentSchema.description} for ${paramName(e.instancePath)} but received ${describeValue(e.data)}`, paramName(e.instancePath), 'invalid_value')
    return invalidRequest(`Unrecognized request argument supplied: ${name}`, name, 'unknown_parameter')
  }
  if (e.keyword === 'required') {
    const missing = String(e.params['missingProperty'])
    const name = paramName(e.instancePath, missing)
    const what = e.parentSchema?.properties?.[missing]?.description ?? 'a value'
    return invalidRequest(`Expected ${what} for ${name} but received undefined`, name, 'missing_parameter')
  }
  const name = paramName(e.instancePath) || 'body'
  const what = e.parentSchema?.description ?? e.message ?? 'a valid value'
  return invalidRequest(`Expected ${what} for ${name} but received ${describeValue(e.data)}`, name, 'invalid_value')
}

/** Any error thrown while handling a request, as the response it becomes. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err
  const f = err as Partial<FastifyError> & { validation?: SchemaError[] }
  if (f && Array.isArray(f.validation) && f.validation.length) return schemaError(f.validation)
  switch (f?.code) {
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return invalidRequest(`Could not parse the request body as JSON: ${f.message}`, null, 'invalid_json')
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new ApiError(413, `The request body is larger than the server's limit: ${f.message}`, 'invalid_request_error', null, 'body_too_large')
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new ApiError(415, `Expected a request body of type application/json: ${f.message}`, 'invalid_request_error', null, 'unsupported_media_type')
  }
  if (typeof f?.statusCode === 'number' && f.statusCode >= 400 && f.statusCode < 500 && typeof f.message === 'string')
    return new ApiError(f.statusCode, f.message, 'invalid_request_error', null, f.code ?? null)
  return new ApiError(500, 'The server failed to handle the request; its log says why', 'server_error', null, 'internal_error')
}
