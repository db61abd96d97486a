// The Hermes tool-call reader of `detinfer serve --tool-call-parser hermes`: what a text parses to,
// and that a streamed answer, cut into pieces anywhere, gives the content and calls of the whole.
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { GrammarEngine } from '../../lib/grammar.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import {
  forcedToolCallSchema,
  parseForcedToolCalls,
  parseHermesToolCalls,
  parseLlamaJsonToolCalls,
  parseToolCalls,
  pythonJson,
  strictHermesCallsFormat,
  strictLlamaCallsFormat,
  toolCallId,
  ToolCallStream,
} from '../../lib/server/tool-calls.js'

const CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
const CALL2 = '<tool_call>\n{"name":"get_time","arguments":{"zone":"Europe/Paris","utc":false}}\n</tool_call>'

describe('parseHermesToolCalls', () => {
  it('text before the first call is the content; each block is a call, arguments as Python writes JSON', () => {
    expect(parseHermesToolCalls(`Let me check.\n${CALL}`)).toEqual({
      content: 'Let me check.\n',
      calls: [{ name: 'get_weather', arguments: '{"city": "Paris", "days": [1, 2]}' }],
    })
    expect(parseHermesToolCalls(`${CALL}\n${CALL2}`)).toEqual({
      content: null,
      calls: [
        { name: 'get_weather', arguments: '{"city": "Paris", "days": [1, 2]}' },
        { name: 'get_time', arguments: '{"zone": "Europe/Paris", "utc": false}' },
      ],
    })
  })

  it('whitespace alone before the calls is no content; text between and after blocks is dropped (as vLLM)', () => {
    expect(parseHermesToolCalls(`\n\n ${CALL} and then ${CALL2} done`)?.content).toBe(null)
    expect(parseHermesToolCalls(`\n\n ${CALL} and then ${CALL2} done`)?.calls.map((c) => c.name)).toEqual(['get_weather', 'get_time'])
  })

  it('a last block left unclosed is a call when its JSON is whole', () => {
    expect(parseHermesToolCalls('<tool_call>\n{"name": "f", "arguments": {}}\n')).toEqual({ content: null, calls: [{ name: 'f', arguments: '{}' }] })
  })

  it.each([
    ['no tag', 'Just an answer.'],
    ['malformed JSON', `Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>`],
    ['a block cut short', `${CALL}\n<tool_call>\n{"name": "f", "argu`],
    ['no name', '<tool_call>\n{"arguments": {}}\n</tool_call>'],
    ['an empty name', '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>'],
    ['arguments not an object', '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>'],
    ['no arguments', '<tool_call>\n{"name": "f"}\n</tool_call>'],
    ['not an object', '<tool_call>\n[1]\n</tool_call>'],
  ])('%s: no calls, the whole text is the content', (_, text) => {
    expect(parseHermesToolCalls(text)).toBe(null)
  })

  it('pythonJson writes as json.dumps(ensure_ascii=False)', () => {
    expect(pythonJson({ a: [1, 2.5, null, true], b: { c: 'é "q"\n' }, d: [], e: {} })).toBe('{"a": [1, 2.5, null, true], "b": {"c": "é \\"q\\"\\n"}, "d": [], "e": {}}')
  })

  it("arguments keep their numbers and key order as json.loads reads them and json.dumps writes them back (vLLM's text)", () => {
    const args = '{"id": 12345678901234567890, "x": 1.0, "y": 1e5, "z": -0.0, "w": 1.5e-7, "v": 1e16, "u": 0.00001, "10": "a", "2": "b", "t": 1, "t": 2}'
    const written = '{"id": 12345678901234567890, "x": 1.0, "y": 100000.0, "z": -0.0, "w": 1.5e-07, "v": 1e+16, "u": 1e-05, "10": "a", "2": "b", "t": 2}'
    expect(parseHermesToolCalls(`<tool_call>\n{"name": "f", "arguments": ${args}}\n</tool_call>`)).toEqual({ content: null, calls: [{ name: 'f', arguments: written }] })
    expect(parseLlamaJsonToolCalls(`{"name": "f", "parameters": ${args}}`)).toEqual({ content: null, calls: [{ name: 'f', arguments: written }] })
  })

  it('call ids are derived from the prompt, the choice, the generated ids and the call', () => {
    const id = toolCallId([1, 2], 0, [3, 4], 0)
    expect(id).toMatch(/^call_[0-9a-f]{24}$/)
    expect(toolCallId([1, 2], 0, [3, 4], 0)).toBe(id)
    for (const other of [toolCallId([1, 3], 0, [3, 4], 0), toolCallId([1, 2], 1, [3, 4], 0), toolCallId([1, 2], 0, [3, 5], 0), toolCallId([1, 2], 0, [3, 4], 1)])
      expect(other).not.toBe(id)
  })
})

describe('ToolCallStream', () => {
  /** The text in `pieces` as a stream gives it: content sent as it comes, then what finish() adds. */
  function stream(pieces: string[]) {
    const s = new ToolCallStream()
    const sent = pieces.map((p) => s.push(p))
    const end = s.finish()
    return { sent, content: sent.join('') + end.content, parsed: end.parsed }
  }

  const texts = [
    `Let me check.\n${CALL}`,
    `${CALL}\n${CALL2}`,
    `  \n${CALL}`,
    'A plain answer with a < sign and <tool_ but no call.',
    'Ends with a partial tag <tool_c',
    `Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>`,
    '   ',
    '',
  ]

  it.each(texts)('every cut of %j streams the content and calls of the whole', (text) => {
    const whole = parseHermesToolCalls(text)
    const wholeContent = whole ? (whole.content ?? '') : text
    // Every split into two pieces, and into single characters.
    const splits = [...Array.from({ length: text.length + 1 }, (_, i) => [text.slice(0, i), text.slice(i)]), [...text]]
    for (const pieces of splits) {
      const s = stream(pieces)
      expect(s.content).toBe(wholeContent)
      expect(s.parsed).toEqual(whole)
    }
  })

  it('sends content at once up to what may begin a tag, and nothing after a tag begins', () => {
    expect(stream(['Let me', ' check.', '\n<', 'tool_call>', '\n{"name"']).sent).toEqual(['Let me', ' check.', '\n', '', ''])
    expect(stream(['a <tool', 'box> b']).sent).toEqual(['a ', '<toolbox> b'])
    // Leading whitespace waits for text: before calls it is no content.
    expect(stream([' \n', 'Hi']).sent).toEqual(['', ' \nHi'])
  })
})

describe('llama3_json', () => {
  const WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}'
  const TIME = '{"name":"get_time","arguments":{"zone":"Europe/Paris","note":"a } and a ; in a string"}}'

  it('an answer of JSON calls separated by ";" is calls, "parameters" or "arguments", written as Python writes JSON', () => {
    expect(parseLlamaJsonToolCalls(WEATHER)).toEqual({ content: null, calls: [{ name: 'get_weather', arguments: '{"city": "Paris", "days": [1, 2]}' }] })
    expect(parseLlamaJsonToolCalls(`\n ${WEATHER}; ${TIME};\n`)).toEqual({
      content: null,
      calls: [
        { name: 'get_weather', arguments: '{"city": "Paris", "days": [1, 2]}' },
        { name: 'get_time', arguments: '{"zone": "Europe/Paris", "note": "a } and a ; in a string"}' },
      ],
    })
    expect(parseToolCalls('llama3_json', WEATHER)).toEqual(parseLlamaJsonToolCalls(WEATHER))
    expect(parseToolCalls('hermes', WEATHER)).toBe(null)
  })

  it.each([
    ['prose', 'The weather is fine.'],
    ['prose before the JSON (not read, unlike vLLM on whole answers)', `Calling: ${WEATHER}`],
    ['text after the calls', `${WEATHER} and more`],
    ['malformed JSON', '{"name": "f", "parameters": {"a": }}'],
    ['a call cut short', `${WEATHER}; {"name": "f", "param`],
    ['no name', '{"parameters": {}}'],
    ['both parameters and arguments', '{"name": "f", "parameters": {}, "arguments": {}}'],
    ['parameters not an object', '{"name": "f", "parameters": "{}"}'],
    ['two calls without ";"', `${WEATHER} ${WEATHER}`],
    // Calls come after JSON's whitespace only, as the grammar of strict calls can tell them.
    ['a Unicode space before the JSON', `\u00a0${WEATHER}`],
  ])('%s: no calls, the whole text is the content', (_, text) => {
    expect(parseLlamaJsonToolCalls(text)).toBe(null)
  })

  it.each([WEATHER, `${WEATHER}; ${TIME}`, ` \n${WEATHER}`, `\u00a0${WEATHER}`, 'A plain answer { with a brace.', '  Indented answer.', '{"name": "f", "parameters": {"a": }}', ''])(
    'every cut of %j streams the content and calls of the whole',
    (text) => {
      const whole = parseLlamaJsonToolCalls(text)
      const wholeContent = whole ? (whole.content ?? '') : text
      const splits = [...Array.from({ length: text.length + 1 }, (_, i) => [text.slice(0, i), text.slice(i)]), [...text]]
      for (const pieces of splits) {
        const s = new ToolCallStream('llama3_json')
        const sent = pieces.map((p) => s.push(p)).join('')
        const end = s.finish()
        expect(sent + end.content).toBe(wholeContent)
        expect(end.parsed).toEqual(whole)
      }
    },
  )

  it('streams content at once once the first character shows it is content, and nothing of an answer that starts with "{"', () => {
    const sent = (pieces: string[]) => {
      const s = new ToolCallStream('llama3_json')
      return pieces.map((p) => s.push(p))
    }
    expect(sent([' \n', 'Hi', ' there'])).toEqual(['', ' \nHi', ' there'])
    expect(sent(['{"name"', ': "f"'])).toEqual(['', ''])
  })
})

describe('strict calls: the structural tags that hold calls to the tools\' parameters', () => {
  const city = { type: 'object', properties: { city: { enum: ['Paris', 'Rome'] } }, required: ['city'], additionalProperties: false }
  const tools = [{ name: 'get_weather', parameters: city, strict: true }, { name: 'ping' }]
  const format = strictLlamaCallsFormat(tools)
  let t: Tokenizer
  let engine: GrammarEngine
  beforeAll(async () => {
    t = await Tokenizer.load(join(import.meta.dirname, '..', '..', 'models', 'default'))
    engine = new GrammarEngine(t, t.vocabSize)
  })
  afterAll(() => {
    engine.dispose()
    t.close()
  })

  /** Whether the grammar `tag` lets `text` through, token by token, and then lets the answer end. */
  async function accepts(text: string, tag: Record<string, unknown> = format): Promise<boolean> {
    const ids = t.encodeContinuation(text)
    expect(t.decode(ids)).toBe(text)
    const allows = (mask: Int32Array, id: number) => ((mask[id >> 5]! >>> (id & 31)) & 1) === 1
    const c = (await engine.constrain({ type: 'structural_tag', format: tag }))!
    try {
      for (const id of ids) {
        if (!allows(await c.mask(), id)) return false
        c.accept(id)
      }
      return allows(await c.mask(), t.eosTokenIds[0]!)
    } finally {
      c.dispose()
    }
  }

  const weather = (name: string) => `{"name": "get_weather", "parameters": {"city": "${name}"}}`
  it.each([
    // Content: its first character after JSON whitespace is not "{"; then anything.
    ['prose', 'The weather is fine.', null],
    ['prose with braces after whitespace', ' \n Hello {x}', null],
    ['nothing, or whitespace alone', '  \n', null],
    ['prose starting with a Unicode space, then call-like JSON', `\u00a0{"name": "get_weather", "parameters": {"city": "Oslo"}}`, null],
    // Calls: "; " between them, the strict tool's parameters held to its schema, any object for the other.
    ['one call', weather('Rome'), [{ name: 'get_weather', arguments: '{"city": "Rome"}' }]],
    [
      'two calls after a newline',
      `\n${weather('Paris')}; {"name": "ping", "parameters": {"any": [1, {"b": null}]}}`,
      [
        { name: 'get_weather', arguments: '{"city": "Paris"}' },
        { name: 'ping', arguments: '{"any": [1, {"b": null}]}' },
      ],
    ],
  ] as const)('lets %s through, and it reads as the parser reads it', async (_, text, calls) => {
    expect(await accepts(text)).toBe(true)
    expect(parseLlamaJsonToolCalls(text)).toEqual(calls === null ? null : { content: null, calls })
  })

  it.each([
    ['a value the schema does not accept', weather('Oslo')],
    ['a tool that is not among them', '{"name": "get_time", "parameters": {}}'],
    ['text after the calls', `${weather('Rome')} and then`],
    ['"arguments" for "parameters"', '{"name": "ping", "arguments": {}}'],
    ['JSON that is not a call', '{"city": "Rome"}'],
    ['whitespace inside the JSON', '{"name": "ping", "parameters": { }}'],
  ])('llama3_json refuses %s', async (_, text) => {
    expect(await accepts(text)).toBe(false)
  })

  it('llama3_json with parallel_tool_calls false (single): one call, then the answer ends', async () => {
    const single = strictLlamaCallsFormat(tools, true)
    expect(await accepts(weather('Rome'), single)).toBe(true)
    expect(await accepts('Just prose; {"name": "ping"}', single)).toBe(true)
    const two = `${weather('Rome')}; {"name": "ping", "parameters": {}}`
    expect(await accepts(two)).toBe(true)
    expect(await accepts(two, single)).toBe(false)
  })

  const hermes = (name: string) => `<tool_call>\n{"name": "get_weather", "arguments": {"city": "${name}"}}\n</tool_call>`
  it('hermes: free text around calls, each call held to its tool\'s parameters; with single, the answer ends after the first', async () => {
    const many = strictHermesCallsFormat(tools)
    const single = strictHermesCallsFormat(tools, true)
    const ping = '<tool_call>\n{"name": "ping", "arguments": {"x": [1]}}\n</tool_call>'
    for (const tag of [many, single]) {
      expect(await accepts('No call needed.', tag)).toBe(true)
      expect(await accepts(`Let me look.\n${hermes('Paris')}`, tag)).toBe(true)
      expect(await accepts(hermes('Oslo'), tag)).toBe(false)
      expect(await accepts('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', tag)).toBe(false)
    }
    expect(await accepts(`${hermes('Rome')}\n${ping}`, many)).toBe(true)
    expect(await accepts(`${hermes('Rome')}\nDone.`, many)).toBe(true)
    expect(await accepts(`${hermes('Rome')}\n${ping}`, single)).toBe(false)
    expect(await accepts(`${hermes('Rome')}\nDone.`, single)).toBe(false)
  })
})

describe('forced calls (tool_choice "required" or a named function)', () => {
  const city = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }
  const tools = [{ name: 'get_weather', parameters: city }, { name: 'ping' }]

  it('the grammar: the named function\'s parameters (an object for one without), or a list of calls of the tools', () => {
    expect(forcedToolCallSchema({ function: 'get_weather' }, tools)).toBe(city)
    expect(forcedToolCallSchema({ function: 'ping' }, tools)).toEqual({ type: 'object', properties: {} })
    const call = (name: string, parameters: unknown) => ({ type: 'object', properties: { name: { type: 'string', enum: [name] }, parameters }, required: ['name', 'parameters'] })
    const items = { type: 'object', anyOf: [call('get_weather', city), call('ping', { type: 'object', properties: {} })] }
    expect(forcedToolCallSchema({ required: true, parallel: true }, tools)).toEqual({ type: 'array', minItems: 1, items })
    expect(forcedToolCallSchema({ required: true, parallel: false }, tools)).toEqual({ type: 'array', minItems: 1, maxItems: 1, items })
  })

  it('parameters {} is a function without parameters (as vLLM reads it): its arguments are an object, so the forced answer is a call', () => {
    const empty = [{ name: 'ping', parameters: {} }]
    expect(forcedToolCallSchema({ function: 'ping' }, empty)).toEqual({ type: 'object', properties: {} })
    const items = (forcedToolCallSchema({ required: true, parallel: true }, empty) as { items: { anyOf: { properties: { parameters: unknown } }[] } }).items
    expect(items.anyOf[0]!.properties.parameters).toEqual({ type: 'object', properties: {} })
  })

  it('"required": the tools\' $defs (pydantic\'s nested models) move to the root, where their $refs point; two different ones of a name are refused', async () => {
    const place = { $defs: { City: { type: 'string', enum: ['Paris', 'Rome'] } }, type: 'object', properties: { city: { $ref: '#/$defs/City' } }, required: ['city'] }
    const when = { definitions: { Day: { enum: ['today', 'tomorrow'] } }, type: 'object', properties: { day: { $ref: '#/definitions/Day' } }, required: ['day'] }
    const schema = forcedToolCallSchema({ required: true, parallel: false }, [{ name: 'weather', parameters: place }, { name: 'when', parameters: when }])
    expect(schema['$defs']).toEqual(place.$defs)
    expect(schema['definitions']).toEqual(when.definitions)
    const t = await Tokenizer.load(join(import.meta.dirname, '..', '..', 'models', 'default'))
    const engine = new GrammarEngine(t, t.vocabSize)
    try {
      const c = (await engine.constrain({ type: 'json_schema', schema }))!
      for (const id of t.encodeContinuation('[{"name": "weather", "parameters": {"city": "Rome"}}]')) {
        await c.mask()
        c.accept(id)
      }
      await c.mask()
      expect(c.finished).toBe(true)
      c.dispose()
    } finally {
      engine.dispose()
      t.close()
    }
    const other = { ...place, $defs: { City: { type: 'string' } } }
    expect(() => forcedToolCallSchema({ required: true, parallel: true }, [{ name: 'a', parameters: place }, { name: 'b', parameters: other }])).toThrow(
      'Expected one schema for the tools\' $defs.City but the tools define it differently (b and an earlier tool)',
    )
  })

  it('reads the answer back: arguments written as Python writes them; an answer cut short is content', () => {
    expect(parseForcedToolCalls({ function: 'get_weather' }, '{"city":"Paris","n":1.0}')).toEqual({ content: null, calls: [{ name: 'get_weather', arguments: '{"city": "Paris", "n": 1.0}' }] })
    expect(parseForcedToolCalls({ function: 'get_weather' }, '{"city": "Par')).toBe(null)
    const list = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "ping", "parameters": {}}]'
    expect(parseForcedToolCalls({ required: true, parallel: true }, list)).toEqual({
      content: null,
      calls: [{ name: 'get_weather', arguments: '{"city": "Oslo"}' }, { name: 'ping', arguments: '{}' }],
    })
    for (const bad of ['[]', '[{"name": "ping"}]', '{"name": "ping", "parameters": {}}', '[{"name": "ping", "parameters": {}}'])
      expect(parseForcedToolCalls({ required: true, parallel: true }, bad), bad).toBe(null)
  })

  it('streamed: nothing goes out as content, and the end gives the calls of the whole text', () => {
    const s = new ToolCallStream({ function: 'get_weather' })
    expect(['{"city"', ': "Rome"}'].map((p) => s.push(p))).toEqual(['', ''])
    expect(s.finish()).toEqual({ content: '', parsed: { content: null, calls: [{ name: 'get_weather', arguments: '{"city": "Rome"}' }] } })
    const cut = new ToolCallStream({ required: true, parallel: false })
    cut.push('[{"name": "pi')
    expect(cut.finish()).toEqual({ content: '[{"name": "pi', parsed: null })
  })
})
