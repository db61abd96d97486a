// Grammar-constrained decoding (lib/grammar.ts) on the shipped tokenizer, the test models'
// tokenizers and a SentencePiece-style byte-fallback tokenizer written here: valid JSON texts
// pass token by token, tokens that break them are refused, special tokens never appear inside
// JSON text, bad schemas are refused with their reason and without a word on stderr, and
// disposing frees everything.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { DisposedError } from '../lib/errors.js'
import { abortReason, GrammarEngine, GrammarError, unsupportedKeyword, type GrammarEngineOptions, type TokenConstraint } from '../lib/grammar.js'
import { Tokenizer } from '../lib/tokenizer.js'
import { strictHermesCallsFormat } from '../lib/server/tool-calls.js'
import { runModuleScript } from './helpers/server.js'

const repoRoot = join(import.meta.dirname, '..')
let tmp: string
let sentencePieceDir: string
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'detinfer-grammar-'))
  sentencePieceDir = writeSentencePieceTokenizer(join(tmp, 'sentencepiece'))
})
afterAll(() => rmSync(tmp, { recursive: true, force: true }))

const engines: GrammarEngine[] = []
afterEach(() => {
  for (const e of engines.splice(0)) e.dispose()
})

function engineFor(tokenizer: Tokenizer, vocabSize = tokenizer.vocabSize, options: GrammarEngineOptions = {}): GrammarEngine {
  const engine = new GrammarEngine(tokenizer, vocabSize, options)
  engines.push(engine)
  return engine
}

const allows = (mask: Int32Array, id: number) => ((mask[id >> 5]! >>> (id & 31)) & 1) === 1
const allowedIds = (mask: Int32Array) => {
  const ids: number[] = []
  for (let id = 0; id < mask.length * 32; id++) if (allows(mask, id)) ids.push(id)
  return ids
}

const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    age: { type: 'integer' },
    tags: { type: 'array', items: { type: 'string' } },
    color: { enum: ['red', 'green', 'blue'] },
    address: {
      type: 'object',
      properties: { city: { type: 'string' }, zip: { type: 'integer' } },
      required: ['city', 'zip'],
    },
  },
  required: ['name', 'age', 'tags', 'color', 'address'],
}
const VALUE = { name: 'café ✓', age: 42, tags: ['a', 'b c'], color: 'green', address: { city: 'Zürich', zip: 8001 } }

/** JSON as Python's json.dumps writes it (", " and ": "), the one way the grammars allow. */
function dumps(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(dumps).join(', ')}]`
  if (typeof value === 'object' && value !== null) return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${dumps(v)}`).join(', ')}}`
  return JSON.stringify(value)
}

/** Feeds `ids` to the constraint, checking that each is allowed by the mask before it. */
async function drive(c: TokenConstraint, ids: readonly number[], show: (id: number) => string): Promise<void> {
  for (const [i, id] of ids.entries()) {
    const mask = await c.mask()
    expect(allows(mask, id), `token ${i} (${id}, ${JSON.stringify(show(id))})`).toBe(true)
    expect(c.finished).toBe(false)
    c.accept(id)
  }
}

/** The ids of a JSON text as the model would write it after a prompt (no BOS, no prefix space). */
function idsOf(t: Tokenizer, text: string): number[] {
  const ids = t.encode(text, { addSpecialTokens: false })
  // A SentencePiece tokenizer puts ▁ in front of a text; what follows a prompt has none.
  if (t.decode([ids[0]!]) === '' || /^\s$/.test(new TextDecoder().decode(t.tokenBytes(ids[0]!)))) ids.shift()
  expect(t.decode(ids)).toBe(text)
  return ids
}

const TOKENIZERS: [string, () => string][] = [
  ['the shipped model', () => join(repoRoot, 'models', 'default')],
  ...['llama', 'mistral', 'qwen2', 'qwen3'].map((name): [string, () => string] => [name, () => join(repoRoot, 'test', 'fixtures', 'hf', name)]),
  ['a SentencePiece byte-fallback tokenizer', () => sentencePieceDir],
]

describe.each(TOKENIZERS)('grammar constraints on %s', (_, dir) => {
  let t: Tokenizer
  beforeAll(async () => {
    t = await Tokenizer.load(dir())
  })
  afterAll(() => t.close())
  const show = (id: number) => t.decode([id], { skipSpecialTokens: false })
  const whitespaceOnly = (id: number) => /^\s+$/.test(new TextDecoder().decode(t.tokenBytes(id)))

  it('lets a JSON text that follows the schema through, token by token, then only EOS', async () => {
    const engine = engineFor(t)
    for (const text of [dumps(VALUE)]) {
      const c = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
      await drive(c, idsOf(t, text), show)
      const end = await c.mask()
      expect(end.length).toBe(Math.ceil(t.vocabSize / 32))
      expect(c.finished).toBe(true)
      expect(t.eosTokenIds.length).toBeGreaterThan(0)
      for (const eos of t.eosTokenIds) expect(allows(end, eos)).toBe(true)
      const others = allowedIds(end).filter((id) => !t.eosTokenIds.includes(id))
      expect(others.filter((id) => !whitespaceOnly(id)).map(show)).toEqual([])
      c.accept(t.eosTokenIds[0]!)
      expect(c.finished).toBe(true)
      await expect(c.mask()).rejects.toThrow('a stop token was accepted')
      expect(() => c.accept(t.eosTokenIds[0]!)).toThrow('has ended')
      c.dispose()
    }
  })

  it('one way of writing: no newline or extra space between elements (a model cannot fill its answer with them)', async () => {
    const engine = engineFor(t)
    for (const format of [{ type: 'json_schema', schema: SCHEMA } as const, { type: 'json_object' } as const]) {
      const c = (await engine.constrain(format))!
      await drive(c, idsOf(t, '{'), show)
      const mask = await c.mask()
      const spaces = allowedIds(mask).filter(whitespaceOnly)
      expect(spaces.map(show)).toEqual([])
      expect(Array.from({ length: t.vocabSize }, (_, id) => id).filter(whitespaceOnly).length).toBeGreaterThan(0)
      expect(allows(mask, idsOf(t, '"')[0]!)).toBe(true)
      c.dispose()
    }
  })

  it('refuses a token that breaks the JSON: the mask leaves it out and accept() throws', async () => {
    const engine = engineFor(t)
    const c = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
    const close = idsOf(t, '}')[0]!
    const open = idsOf(t, '{')[0]!
    const mask = await c.mask()
    expect(allows(mask, close)).toBe(false)
    expect(allows(mask, open)).toBe(true)
    for (const eos of t.eosTokenIds) expect(allows(mask, eos)).toBe(false)
    expect(() => c.accept(close)).toThrow(`Token ${close} is not allowed by the grammar`)
    // Without a mask computed first, xgrammar itself refuses it.
    const fresh = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
    expect(() => fresh.accept(close)).toThrow(`Token ${close} is not allowed by the grammar`)
    expect(() => fresh.accept(t.vocabSize)).toThrow(RangeError)
    expect(() => fresh.accept(1.5)).toThrow(RangeError)
    // A refused token changes nothing: the text still goes through.
    await drive(fresh, idsOf(t, dumps(VALUE)), show)
    expect(allows(await fresh.mask(), t.eosTokenIds[0]!)).toBe(true)
    // A value the schema does not allow: after `{"name": "x", "age": `, a string is refused.
    const wrong = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
    await drive(wrong, idsOf(t, '{"name": "x", "age": '), show)
    expect(allows(await wrong.mask(), idsOf(t, '"')[0]!)).toBe(false)
    for (const x of [c, fresh, wrong]) x.dispose()
  })

  it('never allows a special token inside JSON text, nor an id the tokenizer lacks', async () => {
    const padded = t.vocabSize + 45
    const engine = engineFor(t, padded)
    const names = [...Object.values(t.specialTokenTexts), '<|im_end|>', '<|im_start|>', '[INST]']
    const specials = [...new Set(names.flatMap((name) => t.encode(name, { addSpecialTokens: false }).filter((id) => show(id) === name)))]
    expect(specials.length).toBeGreaterThanOrEqual(3)
    for (const format of [{ type: 'json_object' } as const, { type: 'json_schema', schema: SCHEMA } as const]) {
      const c = (await engine.constrain(format))!
      const insideString = idsOf(t, '{"name": "ab')
      for (let i = 0; i <= insideString.length; i++) {
        const mask = await c.mask()
        expect(mask.length).toBe(Math.ceil(padded / 32))
        for (const id of specials) expect(allows(mask, id), `${show(id)} after ${i} tokens`).toBe(false)
        for (let id = t.vocabSize; id < padded; id++) expect(allows(mask, id)).toBe(false)
        if (i < insideString.length) c.accept(insideString[i]!)
      }
      // Inside the string, any text token may come (the mask is not empty).
      expect(allowedIds(await c.mask()).length).toBeGreaterThan(100)
      c.dispose()
    }
  })

  it('json_object allows any JSON object, and nothing else at the top', async () => {
    const engine = engineFor(t)
    for (const text of ['{"a": [1, 2.5, {"b": null}], "c": "café ✓", "d": true, "e": -3e2}', '{"x": {}}', '{}']) {
      const c = (await engine.constrain({ type: 'json_object' }))!
      await drive(c, idsOf(t, text), show)
      const end = await c.mask()
      expect(c.finished).toBe(true)
      expect(allows(end, t.eosTokenIds[0]!)).toBe(true)
      c.dispose()
    }
    const c = (await engine.constrain({ type: 'json_object' }))!
    const first = await c.mask()
    expect(allows(first, idsOf(t, '{')[0]!)).toBe(true)
    for (const text of ['[', '"', '1', 't', 'n']) expect(allows(first, idsOf(t, text)[0]!), `${JSON.stringify(text)} at the top`).toBe(false)
    c.dispose()
  })
})

describe('a vocabulary that cannot write what the grammar needs next', () => {
  it('mask() rejects at the dead end instead of allowing no token (a step would refuse that mask, failing the others too)', async () => {
    // Raw pieces without a space: `{"a": ` cannot be written past the colon.
    const pieces = ['', '{', '}', '"', 'a', ':', '1', ',']
    const engine = new GrammarEngine({ grammarVocabulary: () => ({ pieces, vocabType: 'raw', addPrefixSpace: false, stopTokenIds: [0] }) }, 40)
    engines.push(engine)
    const c = (await engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { a: { type: 'integer' } }, required: ['a'] } }))!
    for (const id of [1, 3, 4, 3, 5]) {
      expect(allowedIds(await c.mask())).toEqual([id])
      c.accept(id)
    }
    await expect(c.mask()).rejects.toThrow(/No token of the vocabulary can continue the text/)
    c.dispose()
  })
})

describe('grammar vocabulary of a tokenizer', () => {
  it('is byte_level for ByteLevel decoders and byte_fallback for ByteFallback ones, as xgrammar detects them', async () => {
    const byteLevel = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const v = byteLevel.grammarVocabulary()
    expect([v.vocabType, v.addPrefixSpace, v.pieces.length]).toEqual(['byte_level', false, byteLevel.vocabSize])
    expect(v.stopTokenIds).toEqual(byteLevel.eosTokenIds)
    const imEnd = byteLevel.encode('<|im_end|>', { addSpecialTokens: false })[0]!
    expect(v.pieces[imEnd]).toBe('')
    expect(v.pieces.filter((p) => p === '').length).toBe(3) // the three special tokens
    byteLevel.close()
    const sp = await Tokenizer.load(sentencePieceDir)
    const w = sp.grammarVocabulary()
    expect([w.vocabType, w.addPrefixSpace]).toEqual(['byte_fallback', true])
    expect(w.pieces[3 + 0x41]).toBe('<0x41>')
    expect(w.pieces.slice(0, 3)).toEqual(['', '', ''])
    sp.close()
  })
})

describe('regular expressions, choices and EBNF grammars (structural tags)', () => {
  let t: Tokenizer
  beforeAll(async () => {
    t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
  })
  afterAll(() => t.close())
  const show = (id: number) => t.decode([id])

  it('lets a text they accept through, token by token, then only EOS; refuses one they do not', async () => {
    const engine = engineFor(t)
    const cases = [
      [{ type: 'regex', pattern: '[A-Z][a-z]+ [0-9]{2}' }, 'Romeo 16', 'romeo 16'],
      [{ type: 'choice', choices: ['Montague', 'Capulet', 'neither "house"'] }, 'neither "house"', 'Capul'],
      [{ type: 'grammar', grammar: 'root ::= "(" expr ")"\nexpr ::= [0-9]+ ("+" [0-9]+)*' }, '(12+3+45)', '(12-3)'],
    ] as const
    for (const [format, good, bad] of cases) {
      const c = (await engine.constrain(format))!
      await drive(c, idsOf(t, good), show)
      const end = await c.mask()
      expect(c.finished, format.type).toBe(true)
      expect(allowedIds(end).filter((id) => !t.eosTokenIds.includes(id))).toEqual([])
      c.dispose()
      // The first token of the bad text that the grammar refuses is left out of the mask.
      const d = (await engine.constrain(format))!
      let refused = false
      for (const id of idsOf(t, bad)) {
        if (!allows(await d.mask(), id)) {
          refused = true
          expect(() => d.accept(id)).toThrow('not allowed')
          break
        }
        d.accept(id)
      }
      if (!refused) expect(d.finished).toBe(false) // a prefix of an accepted text at best
      d.dispose()
    }
  })

  it("a structural tag: free text, and calls in Hermes' format held to their tool's parameters (what strict tools get)", async () => {
    const engine = engineFor(t)
    const city = { type: 'object', properties: { city: { enum: ['Paris', 'Rome'] } }, required: ['city'], additionalProperties: false }
    const format = strictHermesCallsFormat([{ name: 'get_weather', parameters: city, strict: true }, { name: 'ping' }])
    const good = 'Let me see.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call> Done.'
    const c = (await engine.constrain({ type: 'structural_tag', format }))!
    await drive(c, idsOf(t, good), show)
    for (const eos of t.eosTokenIds) expect(allows(await c.mask(), eos)).toBe(true)
    c.dispose()
    const d = (await engine.constrain({ type: 'structural_tag', format }))!
    const prefix = 'Hm.<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    await drive(d, idsOf(t, prefix), show)
    const next = await d.mask()
    expect(allows(next, idsOf(t, 'Oslo')[0]!)).toBe(false)
    expect(allowedIds(next).map(show).every((piece) => 'Paris'.startsWith(piece) || 'Rome'.startsWith(piece))).toBe(true)
    d.dispose()
  })

  it('JSON inside a structural tag is written one way too: no whitespace but ", " and ": " (xgrammar\'s own would let any through)', async () => {
    const engine = engineFor(t)
    const schema = { type: 'object', properties: { mood: { enum: ['merry', 'sad'] }, loud: { type: 'boolean' } }, required: ['mood', 'loud'] }
    const format = { type: 'tag', begin: '<mood>', content: { type: 'json_schema', json_schema: schema }, end: '</mood>' }
    const c = (await engine.constrain({ type: 'structural_tag', format }))!
    const whitespaceOnly = (id: number) => /^\s+$/.test(new TextDecoder().decode(t.tokenBytes(id)))
    const text = '<mood>{"mood": "sad", "loud": false}</mood>'
    const ids = idsOf(t, text)
    for (const [i, id] of ids.entries()) {
      const mask = await c.mask()
      // Where xgrammar's json_schema format would let a newline or a space in: after "<mood>" and "{".
      if (t.decode(ids.slice(0, i)).endsWith('{')) expect(allowedIds(mask).filter(whitespaceOnly).map(show)).toEqual([])
      expect(allows(mask, id), show(id)).toBe(true)
      c.accept(id)
    }
    expect(allowedIds(await c.mask()).filter((id) => !t.eosTokenIds.includes(id))).toEqual([])
    c.dispose()
  })

  it('refuses a structural tag xgrammar refuses with its reason, and a format or field it would not read, or a keyword it would not enforce, by its place; printing nothing', async () => {
    const engine = engineFor(t)
    const tag = (content: unknown) => ({ type: 'tag', begin: '<a>', content, end: '</a>' })
    const cases: [unknown, string][] = [
      // xgrammar's own refusals (C++ exceptions, whose message is read out of its memory).
      [{ type: 'or', elements: [{ type: 'any_text' }, { type: 'const_string', value: 'a' }] }, 'Now we only support all elements in an or format to be unlimited or all limited'],
      [{ type: 'triggered_tags', triggers: ['<b'], tags: [tag({ type: 'any_text' })] }, 'One tag does not match any trigger in a triggered tags format'],
      [{ type: 'const_string' }, 'ConstString format must have a value field with a non-empty string'],
      [{ type: 'sequence', elements: [] }, 'Sequence format must have at least one element'],
      // What it would not read, or not enforce.
      [{ type: 'optional', content: { type: 'const_string', value: 'a' } }, 'format.type "optional" is not a format xgrammar 0.1.27 knows (any_text, const_string, json_schema,'],
      [{ type: 'triggered_tags', triggers: ['<a'], tags: [tag({ type: 'any_text' })], excludes: ['x'] }, 'format.excludes is not a field of a triggered_tags format in xgrammar 0.1.27, which would not enforce it'],
      [{ type: 'sequence', elements: [{ type: 'const_string', value: 'a' }, tag({ type: 'json_schema', json_schema: {}, style: 'qwen_xml' })] }, 'format.elements[1].content.style is not a field of a json_schema format'],
      [{ type: 'tags_with_separator', separator: ',', tags: [{ begin: '<a>', content: { type: 'json_schema', json_schema: { type: 'object', properties: { n: { type: 'integer', multipleOf: 2 } } } }, end: '</a>' }] }, 'format.tags[0].content.json_schema: multipleOf (at #/properties/n) is not supported'],
    ]
    const writes = [vi.spyOn(process.stderr, 'write'), vi.spyOn(process.stdout, 'write')]
    try {
      for (const [format, message] of cases) {
        const err = await engine.constrain({ type: 'structural_tag', format: format as Record<string, unknown> }).catch((e: unknown) => e)
        expect(err, JSON.stringify(format)).toBeInstanceOf(GrammarError)
        expect((err as Error).message).toContain(`The structural tag cannot be used: ${message}`)
      }
      const cyclic: Record<string, unknown> = { type: 'sequence' }
      cyclic['elements'] = [cyclic]
      await expect(engine.constrain({ type: 'structural_tag', format: cyclic })).rejects.toThrow(/^The structural tag cannot be written as JSON: /)
      for (const spy of writes) expect(spy.mock.calls).toEqual([])
    } finally {
      for (const spy of writes) spy.mockRestore()
    }
    // The worker whose module threw was replaced: a good tag after the bad ones.
    const c = (await engine.constrain({ type: 'structural_tag', format: { type: 'triggered_tags', triggers: ['<a>'], tags: [tag({ type: 'regex', pattern: '[0-9]+' })] } }))!
    await drive(c, idsOf(t, 'Count: <a>42</a> ok'), show)
    c.dispose()
  })

  it('refuses a regex or a grammar xgrammar cannot read, naming why and printing nothing; an empty choice list by its shape', async () => {
    const engine = engineFor(t)
    const err = vi.spyOn(process.stderr, 'write')
    try {
      await expect(engine.constrain({ type: 'regex', pattern: '[a-' })).rejects.toThrow(/^The regular expression cannot be used: .+/)
      await expect(engine.constrain({ type: 'grammar', grammar: 'root ::= ' })).rejects.toThrow(/^The grammar cannot be used: .+/)
      await expect(engine.constrain({ type: 'choice', choices: [] })).rejects.toThrow('Expected an array of 1 to 1024 strings for response_format.choices')
      expect(err).not.toHaveBeenCalled()
    } finally {
      err.mockRestore()
    }
    const ok = (await engine.constrain({ type: 'choice', choices: ['yes', 'no'] }))!
    expect(allowedIds(await ok.mask()).length).toBeGreaterThan(0)
    ok.dispose()
  })
})

describe('schemas that cannot be used', () => {
  const BAD: [string, unknown, RegExp][] = [
    ['a type that is not a string', { type: 5 }, /cannot be used: Type should be a string$/],
    ['a $ref to nothing', { $ref: '#/$defs/missing' }, /cannot be used: Cannot find field \$defs/],
    ['a pattern that is no regular expression', { type: 'string', pattern: '[a-' }, /cannot be used: Regex parsing error at position 4: Unclosed '\['/],
    ['an unknown type', { type: 'decimal' }, /cannot be used: Unsupported type "decimal"/],
    ['bounds that cross', { type: 'integer', minimum: 5, maximum: 1 }, /cannot be used: Invalid range: minimum greater than maximum/],
  ]

  it.each(BAD)('refuses %s with GrammarError naming the problem, printing nothing; a valid schema works after', async (_, schema, message) => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = engineFor(t)
    const writes = [vi.spyOn(process.stderr, 'write'), vi.spyOn(process.stdout, 'write')]
    const logs = (['error', 'log', 'warn', 'info'] as const).map((m) => vi.spyOn(console, m))
    try {
      const err = await engine.constrain({ type: 'json_schema', schema }).then(
        () => null,
        (e: unknown) => e,
      )
      expect(err).toBeInstanceOf(GrammarError)
      expect((err as Error).message).toMatch(message)
      expect((err as Error).message).not.toMatch(/\.cc:\d+|Aborted|FATAL/)
      // Again (the worker that aborted was replaced), then a valid schema.
      await expect(engine.constrain({ type: 'json_schema', schema })).rejects.toThrow(message)
      const c = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
      await drive(c, idsOf(t, dumps(VALUE)), (id) => t.decode([id]))
      c.dispose()
      for (const spy of [...writes, ...logs]) expect(spy.mock.calls).toEqual([])
    } finally {
      for (const spy of [...writes, ...logs]) spy.mockRestore()
      t.close()
    }
  })

  it('refuses response formats that are not of OpenAI shape, before xgrammar sees them', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = engineFor(t)
    const cyclic: Record<string, unknown> = { type: 'object' }
    cyclic['self'] = cyclic
    const cases: [unknown, RegExp][] = [
      [null, /Expected an object .* for response_format but received null/],
      [{ type: 'xml' }, /Expected 'text', 'json_object', 'json_schema', 'regex', 'choice', 'grammar' or 'structural_tag' for response_format.type but received "xml" of type string/],
      [{ type: 'json_schema', schema: [1, 2] }, /Expected a JSON Schema \(an object, or true\) for response_format.schema but received \[1,2\] of type array/],
      [{ type: 'json_schema', schema: 'x' }, /for response_format.schema but received "x" of type string/],
      [{ type: 'json_schema' }, /for response_format.schema but received undefined/],
      [{ type: 'json_schema', schema: false }, /is false, which no value matches/],
      [{ type: 'json_schema', schema: cyclic }, /cannot be written as JSON/],
    ]
    for (const [format, message] of cases) await expect(engine.constrain(format as never)).rejects.toThrow(message)
    for (const [format] of cases) await expect(engine.constrain(format as never)).rejects.toBeInstanceOf(GrammarError)
    expect(await engine.constrain({ type: 'text' })).toBeNull()
    // true and {} allow any JSON value.
    for (const schema of [true, {}]) {
      const c = (await engine.constrain({ type: 'json_schema', schema }))!
      await drive(c, idsOf(t, '"just a string"'), (id) => t.decode([id]))
      expect(allows(await c.mask(), t.eosTokenIds[0]!)).toBe(true)
      c.dispose()
    }
    t.close()
  })

  it('refuses keywords xgrammar would not enforce, as vLLM does', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = engineFor(t)
    const cases: [unknown, string][] = [
      [{ type: 'integer', multipleOf: 3 }, 'multipleOf (at #)'],
      [{ type: 'object', properties: { tags: { type: 'array', uniqueItems: true } } }, 'uniqueItems (at #/properties/tags)'],
      [{ type: 'object', properties: { 'a/b': { type: 'array', items: [{ type: ['array'], contains: {} }] } } }, 'contains (at #/properties/a~1b/items/0)'],
      [{ anyOf: [{ type: 'string', format: 'credit-card' }] }, 'format "credit-card" (at #/anyOf/0)'],
      [{ type: 'string', pattern: '^a+$', maxLength: 3 }, 'minLength or maxLength beside pattern or format (at #)'],
      [{ type: 'object', propertyNames: { pattern: '^a' }, properties: { b: {} } }, 'propertyNames beside properties'],
      [{ type: 'object', patternProperties: { '^a': {}, '^b': {} } }, 'patternProperties beside properties, or more than one'],
    ]
    for (const [schema, message] of cases) {
      const err = await engine.constrain({ type: 'json_schema', schema }).catch((e: unknown) => e)
      expect(err).toBeInstanceOf(GrammarError)
      expect((err as Error).message).toContain(`The JSON schema cannot be used: ${message}`)
      expect(unsupportedKeyword(schema)).not.toBeNull()
    }
    // The same keywords where they do not apply, and the ones xgrammar enforces.
    for (const schema of [
      { type: 'string', multipleOf: 3, format: 'email' },
      { type: 'integer', uniqueItems: true },
      { type: 'array', items: { type: 'integer', minimum: 0 }, minItems: 1, maxItems: 3 },
      { type: 'string', format: 'date-time' },
      { type: 'object', patternProperties: { '^a': { type: 'integer' } } },
      { type: 'string', minLength: 1, maxLength: 5 },
      SCHEMA,
    ]) {
      expect(unsupportedKeyword(schema)).toBeNull()
      ;(await engine.constrain({ type: 'json_schema', schema }))!.dispose()
    }
    t.close()
  })

  it('drops an instance of this thread whose compile aborted, and builds another for the next request', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = engineFor(t, t.vocabSize, { workers: 0 })
    ;(await engine.constrain({ type: 'json_object' }))!.dispose()
    type Internals = { instance: Promise<{ compiler: { compileJSONSchema: () => never }; lines: string[] }> | null }
    const first = await (engine as unknown as Internals).instance!
    // As the module aborts: its printErr gets the reason, then the call throws a RuntimeError.
    first.compiler.compileJSONSchema = () => {
      first.lines.push('[FATAL] /src/cpp/grammar_compiler.cc:10: Check failed: (x) is false: something went wrong', 'Aborted()')
      throw new WebAssembly.RuntimeError('Aborted(). Build with -sASSERTIONS for more info.')
    }
    await expect(engine.constrain({ type: 'json_schema', schema: SCHEMA })).rejects.toThrow(
      new GrammarError('The JSON schema cannot be compiled: something went wrong'),
    )
    const c = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
    expect(await (engine as unknown as Internals).instance).not.toBe(first)
    await drive(c, idsOf(t, dumps(VALUE)), (id) => t.decode([id]))
    c.dispose()
    t.close()
  })

  it('takes the reason out of what xgrammar printed', () => {
    const printed = [
      '[WARNING] /src/xgrammar/cpp/json_schema_converter.cc:1032: Support for allOf with multiple options is still ongoing',
      '[FATAL] /src/xgrammar/cpp/json_schema_converter.cc:885: Check failed: (schema_obj.at("type").is<std::string>()) is false: Type should be a string',
      'Aborted()',
    ]
    expect(abortReason(printed, new Error('Aborted(). Build with -sASSERTIONS for more info.'))).toBe('Type should be a string')
    expect(abortReason(['[FATAL] /x/regex_converter.cc:75: Regex parsing error at position 3: Lookbehind is not supported yet.'], null)).toBe(
      'Regex parsing error at position 3: Lookbehind is not supported yet.',
    )
    expect(abortReason([], new Error('Aborted()'))).toBe('Aborted()')
    // A C++ exception reaches JavaScript as the address of its object.
    expect(abortReason([], 141064)).toBe('xgrammar threw a C++ exception')
    expect(abortReason([`[FATAL] a.cc:1: ${'x'.repeat(5000)}`], null)).toMatch(/^x{1000}\.\.\. \(5000 characters\)$/)
  })
})

describe('disposing', () => {
  it('frees a constraint once (idempotent) and every constraint of an engine with it', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = new GrammarEngine(t, t.vocabSize)
    const a = (await engine.constrain({ type: 'json_object' }))!
    const b = (await engine.constrain({ type: 'json_schema', schema: SCHEMA }))!
    a.dispose()
    a.dispose()
    await expect(a.mask()).rejects.toBeInstanceOf(DisposedError)
    expect(() => a.accept(0)).toThrow(DisposedError)
    expect((await b.mask()).length).toBe(Math.ceil(t.vocabSize / 32))
    engine.dispose()
    engine.dispose()
    await expect(b.mask()).rejects.toBeInstanceOf(DisposedError)
    await expect(engine.constrain({ type: 'json_object' })).rejects.toBeInstanceOf(DisposedError)
    await expect(engine.constrain({ type: 'json_schema', schema: { type: 'string' } })).rejects.toBeInstanceOf(DisposedError)
    b.dispose()
    t.close()
  })

  it('keeps at most 64 compiled grammars, and a constraint outlives its grammar being dropped', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    // Every matcher in this thread, whose cache this reads (a worker keeps one of its own).
    const engine = engineFor(t, t.vocabSize, { workers: 0 })
    const first = (await engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { k0: { type: 'integer' } }, required: ['k0'] } }))!
    for (let k = 1; k < 80; k++) (await engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { [`k${k}`]: { type: 'integer' } } } }))!.dispose()
    const kept = (engine as unknown as { built: { compiled: Map<string, unknown> } }).built.compiled
    expect(kept.size).toBe(64)
    expect([...kept.keys()].some((schema) => schema.includes('"k0"'))).toBe(false)
    // The first schema's grammar was dropped; its matcher still works to the end.
    await drive(first, idsOf(t, '{"k0": 12}'), (id) => t.decode([id]))
    expect(first.finished).toBe(false)
    await first.mask()
    expect(first.finished).toBe(true)
    first.dispose()
    t.close()
  })

  it('a check under way when the engine is disposed rejects, and the worker does not hold the process open', async () => {
    const t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
    const engine = new GrammarEngine(t, t.vocabSize)
    const pending = engine.constrain({ type: 'json_schema', schema: { type: 'array', items: { type: 'number' } } })
    engine.dispose()
    await expect(pending).rejects.toBeInstanceOf(DisposedError)
    t.close()
    // A process that used an engine and never disposed it exits on its own; one that disposed it too.
    for (const dispose of [false, true]) {
      const script = `
        import { GrammarEngine } from './dist/grammar.js'
        import { Tokenizer } from './dist/tokenizer.js'
        const t = await Tokenizer.load('models/default')
        const engine = new GrammarEngine(t, t.vocabSize)
        const c = await engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { a: { type: 'integer' } } } })
        await engine.constrain({ type: 'json_schema', schema: { type: 5 } }).catch((e) => console.log(e.name + ': ' + e.message))
        console.log('mask words', (await c.mask()).length)
        ${dispose ? 'engine.dispose()' : ''}
      `
      expect(runModuleScript(script)).toBe('GrammarError: The JSON schema cannot be used: Type should be a string\nmask words 128\n')
    }
  })
})

/**
 * A SentencePiece-style BPE (as Llama 2 and Mistral ship it): ▁ for spaces put in front of the
 * text by the normalizer, byte fallback to <0xNN> pieces for characters outside the vocabulary,
 * and the decoder that undoes both.
 */
function writeSentencePieceTokenizer(dir: string): string {
  mkdirSync(dir, { recursive: true })
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 }
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b
  let next = 259
  const pieces = ['\u2581', ...Array.from({ length: 0x7e - 0x21 + 1 }, (_, i) => String.fromCharCode(0x21 + i)), 'é']
  // No merge makes ▁ part of { [ or ": a text's first token is then ▁ alone, which idsOf() drops.
  const merges: [string, string][] = [['a', 'm'], ['n', 'am'], ['nam', 'e'], ['"', ':'], ['\u2581', 'c'], ['c', 'a'], ['ca', 'f']]
  for (const p of pieces) vocab[p] = next++
  for (const [a, b] of merges) vocab[a + b] = next++
  const added = [
    ['<unk>', 0],
    ['<s>', 1],
    ['</s>', 2],
    ['[INST]', next++],
  ].map(([content, id]) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }))
  const json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: '\u2581' },
        { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' },
      ],
    },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  }
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(json))
  writeFileSync(
    join(dir, 'tokenizer_config.json'),
    JSON.stringify({ bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>', add_bos_token: true, additional_special_tokens: ['[INST]'] }),
  )
  expect(readFileSync(join(dir, 'tokenizer.json'), 'utf8').length).toBeGreaterThan(1000)
  return dir
}
