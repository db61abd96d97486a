// The Model's public boundary: argument validation messages and dispose semantics.
import { getEventListeners } from 'node:events'
import { describe, expect, it, vi } from 'vitest'
import { DisposedError, RequestTooLargeError } from '../../lib/errors.js'
import { EvalWorker } from '../../lib/eval-worker.js'
import { MIN_TEMPERATURE, type ConstraintSource, type TextTokenizer } from '../../lib/generate.js'
import { loadModel, Model } from '../../lib/api.js'
import { ContextHashModel, EOS, charTokenizer } from './context-hash-model.js'

function makeModel() {
  const forward = new ContextHashModel({ kvBlocks: 512, kvBlockSize: 4, maxBatchTokens: 32, context: 4096 })
  forward.eosBias = -100
  const model = new Model({ forward, tokenizer: charTokenizer, path: 'context-hash' }, { maxBatchSize: 8, prefillChunkSize: 8 })
  return { forward, model }
}

describe('Model argument validation', () => {
  const { model } = makeModel()

  it.each([
    [{ maxTokens: 0 }, 'Expected integer between 1 and 4096 for maxTokens but received 0 of type number'],
    [{ maxTokens: 2.5 }, 'Expected integer between 1 and 4096 for maxTokens but received 2.5 of type number'],
    [{ maxTokens: '8' }, 'Expected integer between 1 and 4096 for maxTokens but received "8" of type string'],
    [{ temperature: -1 }, 'Expected 0 (greedy) or a number between 1e-30 and 100 for temperature but received -1 of type number'],
    [{ temperature: 1e-38 }, 'Expected 0 (greedy) or a number between 1e-30 and 100 for temperature but received 1e-38 of type number'],
    [{ temperature: 5e-324 }, 'Expected 0 (greedy) or a number between 1e-30 and 100 for temperature but received 5e-324 of type number'],
    [{ temperature: Number.POSITIVE_INFINITY }, 'Expected 0 (greedy) or a number between 1e-30 and 100 for temperature but received Infinity of type number'],
    [{ temperature: 1, topP: 0 }, 'Expected number greater than 0 and at most 1 for topP but received 0 of type number'],
    [{ temperature: 1, topK: -2 }, 'Expected integer between 0 and 32 for topK but received -2 of type number'],
    [{ temperature: 1, seed: 2 ** 32 }, 'Expected integer between 0 and 4294967295 for seed but received 4294967296 of type number'],
    [{ stop: '' }, 'Expected non-empty string or array of non-empty strings for stop but received "" of type string'],
    [{ stop: '\uD83D' }, 'Expected string of whole characters (no lone surrogate) for stop but received "\\ud83d" of type string'],
    [{ stop: ['ok', 'x\uDE00'] }, 'Expected string of whole characters (no lone surrogate) for stop[1] but received "x\\ude00" of type string'],
    [{ stop: ['a', 3] }, 'Expected non-empty string for stop[1] but received 3 of type number'],
    [{ temperature: 1, minP: 1.5 }, 'Expected number between 0 and 1 for minP but received 1.5 of type number'],
    [{ topLogprobs: 21 }, 'Expected integer between 0 and 20 for topLogprobs but received 21 of type number'],
    [{ topLogprobs: 2.5 }, 'Expected integer between 0 and 20 for topLogprobs but received 2.5 of type number'],
    [{ chat: 'yes' }, 'Expected boolean for chat but received "yes" of type string'],
    [
      { responseFormat: 'json' },
      `Expected { type: 'text' }, { type: 'json_object' }, { type: 'json_schema', schema, strict? }, { type: 'regex', pattern }, { type: 'choice', choices }, { type: 'grammar', grammar } or { type: 'structural_tag', format } for responseFormat but received "json" of type string`,
    ],
    [{ responseFormat: { type: 'xml' } }, `Expected 'text', 'json_object', 'json_schema', 'regex', 'choice', 'grammar' or 'structural_tag' for responseFormat.type but received "xml" of type string`],
    [{ responseFormat: { type: 'regex', pattern: '' } }, 'Expected non-empty string for responseFormat.pattern but received "" of type string'],
    [{ responseFormat: { type: 'choice', choices: [] } }, 'Expected non-empty array of non-empty strings for responseFormat.choices but received [] of type array'],
    [{ responseFormat: { type: 'choice', choices: ['a', 3] } }, 'Expected non-empty string for responseFormat.choices[1] but received 3 of type number'],
    [{ responseFormat: { type: 'grammar', grammar: 5 } }, 'Expected non-empty string for responseFormat.grammar but received 5 of type number'],
    [{ responseFormat: { type: 'regex', pattern: 'a', schema: {} } }, `Expected only 'type', 'pattern' in a responseFormat of type 'regex' but received the key "schema"`],
    [{ responseFormat: { type: 'json_schema' } }, 'Expected JSON Schema (an object, or true or false) for responseFormat.schema but received undefined'],
    [{ responseFormat: { type: 'json_schema', schema: [] } }, 'Expected JSON Schema (an object, or true or false) for responseFormat.schema but received [] of type array'],
    [{ responseFormat: { type: 'json_object', schema: {} } }, `Expected only 'type' in a responseFormat of type 'json_object' but received the key "schema"`],
    [{ responseFormat: { type: 'json_schema', schema: {}, strict: 'yes' } }, 'Expected boolean for responseFormat.strict but received "yes" of type string'],
    [{ responseFormat: { type: 'json_object' }, ignoreEos: true }, 'Expected false with responseFormat json_object (a text the grammar completes ends at EOS) for ignoreEos but received true of type boolean'],
    [{ signal: 'stop' }, 'Expected AbortSignal for signal but received "stop" of type string'],
    [{ presencePenalty: 2.5 }, 'Expected number between -2 and 2 for presencePenalty but received 2.5 of type number'],
    [{ frequencyPenalty: Number.NaN }, 'Expected number between -2 and 2 for frequencyPenalty but received NaN of type number'],
    [{ repetitionPenalty: 0 }, 'Expected number above 0 and at most 2 for repetitionPenalty but received 0 of type number'],
    [{ repetitionPenalty: 2.5 }, 'Expected number above 0 and at most 2 for repetitionPenalty but received 2.5 of type number'],
    [{ repetitionPenalty: Number.NaN }, 'Expected number above 0 and at most 2 for repetitionPenalty but received NaN of type number'],
    [{ logitBias: [[1, 2]] }, 'Expected object or Map of token ids to biases for logitBias but received [[1,2]] of type array'],
    [{ logitBias: { 32: 1 } }, 'Expected integer between 0 and 31 for a key of logitBias but received 32 of type number'],
    [{ logitBias: { x: 1 } }, 'Expected integer between 0 and 31 for a key of logitBias but received "x" of type string'],
    [{ logitBias: new Map([[1.5, 1]]) }, 'Expected integer between 0 and 31 for a key of logitBias but received 1.5 of type number'],
    [{ logitBias: new Map<unknown, number>([[3, 1], ['3', 2]]) }, 'Expected each token id once for logitBias'],
    [{ logitBias: { 3: 101 } }, 'Expected number between -100 and 100 for logitBias[3] but received 101 of type number'],
    [{ logitBias: { 3: '1' } }, 'Expected number between -100 and 100 for logitBias[3] but received "1" of type string'],
    [{ logitBias: Object.fromEntries(Array.from({ length: 301 }, (_, i) => [i, 1])) }, 'Expected at most 300 token ids for logitBias but received 301'],
    [{ maxToken: 3 }, 'Expected only the keys maxTokens, temperature, seed, topK, topP, minP, topLogprobs, frequencyPenalty, presencePenalty, repetitionPenalty, logitBias, responseFormat, stop, stopTokenIds, ignoreEos, chat, chatTemplateVariables, continueFinalMessage, signal for options but received "maxToken" of type string'],
  ])('generate rejects %j', async (options, message) => {
    await expect(model.generate('abc', options as never)).rejects.toThrow(message)
  })

  it('penalties and biases at their neutral values make a plain request; others need a model with processor rows', async () => {
    const plain = await model.generate('abc', { maxTokens: 6 })
    const neutral = await model.generate('abc', { maxTokens: 6, presencePenalty: 0, frequencyPenalty: -0, logitBias: { 3: 0, 5: -0 } })
    expect(neutral).toMatchObject({ tokens: plain.tokens, logprobs: plain.logprobs, text: plain.text })
    // This stand-in model has no processor table.
    await expect(model.generate('abc', { presencePenalty: 1 })).rejects.toThrow('the model has no logit processor rows')
  })

  it('the smallest temperature taken samples the most likely token, as greedy decoding does', async () => {
    const greedy = await model.generate('abc', { maxTokens: 16 })
    const coldest = await model.generate('abc', { maxTokens: 16, temperature: MIN_TEMPERATURE, seed: 5 })
    expect(coldest.tokens).toEqual(greedy.tokens)
  })

  it('rejects bad prompts and completions', async () => {
    await expect(model.generate(42 as never)).rejects.toThrow('Expected string, array of token ids or array of chat messages for prompt but received 42 of type number')
    await expect(model.generate([])).rejects.toThrow('Expected at least one token id for prompt but received [] of type array')
    await expect(model.generate([1, 99])).rejects.toThrow('Expected integer between 0 and 31 for prompt[1] but received 99 of type number')
    await expect(model.generateBatch(['ab', 7] as never)).rejects.toThrow('for prompts[1] but received 7 of type number')
    await expect(model.score('ab', [])).rejects.toThrow('Expected text or ids of at least one token for completion but received [] of type array')
    expect(() => model.stream('ab', { maxTokens: -1 })).toThrow('Expected integer between 1 and 4096 for maxTokens but received -1 of type number')
  })

  it('refuses what can never fit the context with a RequestTooLargeError naming the numbers', async () => {
    // More tokens than the context holds: too large, not a bad argument.
    await expect(model.generate('abc', { maxTokens: 4097 })).rejects.toThrow(new RequestTooLargeError("maxTokens (4097) exceeds the model's context of 4096 tokens"))
    // A prompt that fills the context: the default maxTokens cannot shrink to nothing.
    await expect(model.generate('a'.repeat(4096))).rejects.toThrow(
      new RequestTooLargeError("The prompt (4096 tokens) leaves no room for a completion in the model's context of 4096 tokens"),
    )
  })

  it('names the KV cache when it, not max_position_embeddings, bounds the context', async () => {
    // 16 blocks of 4 positions: 64 positions as loaded, below the config's 4096.
    const forward = new ContextHashModel({ kvBlocks: 16, kvBlockSize: 4, maxBatchTokens: 32, context: 4096 })
    forward.maxPositions = 64
    const small = new Model({ forward, tokenizer: charTokenizer, path: 'small-cache' }, { maxBatchSize: 2, prefillChunkSize: 8 })
    const cache = "the model's context of 64 tokens (the positions its KV cache holds as loaded; max_position_embeddings is 4096)"
    await expect(small.generate('abc', { maxTokens: 65 })).rejects.toThrow(`maxTokens (65) exceeds ${cache}`)
    await expect(small.generate('abc', { maxTokens: 62 })).rejects.toThrow(`The prompt (3 tokens) plus maxTokens (62) exceeds ${cache}`)
    await small.dispose()
  })

  it('says in tokens when the prompt plus completion passes the context', async () => {
    await expect(model.score('a'.repeat(4000), 'b'.repeat(97))).rejects.toThrow(
      "The prompt plus completion is 4097 tokens (4000 + 97) but the model's context is 4096 tokens",
    )
    await expect(model.score('a'.repeat(4000), 'b'.repeat(97))).rejects.toBeInstanceOf(RequestTooLargeError)
  })

  it("names the tokenizer when a user's tokenizer gives ids outside the model's vocabulary", async () => {
    const forward = new ContextHashModel({ kvBlocks: 64, kvBlockSize: 4, maxBatchTokens: 32, context: 256 })
    const stray: TextTokenizer = { ...charTokenizer, encodePrompt: () => [1, 40], encodeChat: () => [], encodeContinuation: () => [2, -1] }
    const odd = new Model({ forward, tokenizer: stray, path: 'stray' }, { maxBatchSize: 2, prefillChunkSize: 8 })
    const message = "Expected token ids between 0 and 31 (the model's vocabulary) from the tokenizer for prompt but received 40 at token 1; the tokenizer does not match the model"
    await expect(odd.generate('ab')).rejects.toThrow(message)
    await expect(odd.generate([{ role: 'user', content: 'x' }])).rejects.toThrow('The tokenizer gave no tokens for prompt')
    await expect(odd.score([1, 2], 'x')).rejects.toThrow('from the tokenizer for completion but received -1 at token 1')
    await odd.dispose()
  })
})

describe('Model.dispose', () => {
  it('fails requests in flight and later calls with a DisposedError, and frees the forward pass once', async () => {
    const { model, forward } = makeModel()
    const inFlight = model.generate('abcdef', { maxTokens: 500 })
    const pieces = model.stream('xyz', { maxTokens: 500 })[Symbol.asyncIterator]()
    expect((await pieces.next()).done).toBe(false)
    await model.dispose()
    await expect(inFlight).rejects.toThrow(DisposedError)
    // Pieces produced before the dispose still arrive, then the stream fails.
    const drain = async () => {
      while (!(await pieces.next()).done);
    }
    await expect(drain()).rejects.toThrow('The model was disposed and cannot be used any more')
    expect(forward.disposed).toBe(true)
    expect(model.disposed).toBe(true)

    await expect(model.generate('abc')).rejects.toThrow(DisposedError)
    await expect(model.generateBatch(['abc'])).rejects.toThrow(DisposedError)
    await expect(model.score('abc', 'd')).rejects.toThrow(DisposedError)
    expect(() => model.stream('abc')).toThrow(DisposedError)
    expect(() => model.tokenize('abc')).toThrow(DisposedError)
    await model.dispose() // a second dispose is harmless
  })

  it('is what Symbol.asyncDispose does', async () => {
    const { model, forward } = makeModel()
    expect((await model.generate('ab', { maxTokens: 3 })).tokens).toHaveLength(3)
    await model[Symbol.asyncDispose]()
    expect(forward.disposed).toBe(true)
    await expect(model.generate('ab')).rejects.toThrow(DisposedError)
  })
})

describe('Model: what a caller passes is checked before anything runs', () => {
  it('generateBatch checks every prompt before submitting any, and a rejected batch leaves nothing running', async () => {
    const { model } = makeModel()
    const unhandled: unknown[] = []
    const onUnhandled = (reason: unknown) => unhandled.push(reason)
    process.on('unhandledRejection', onUnhandled)
    try {
      const long = Array.from({ length: 4000 }, () => 1)
      await expect(model.generateBatch(['ab', 'cd', long], { maxTokens: 100 })).rejects.toThrow(
        new RequestTooLargeError("The prompt (4000 tokens) plus maxTokens (100) exceeds the model's context of 4096 tokens"),
      )
      expect(model.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
      // One that fails while running cancels the others: an aborted signal shared by the batch.
      const abort = new AbortController()
      const batch = model.generateBatch(['ab', 'cd', 'ef'], { maxTokens: 400, signal: abort.signal })
      await new Promise((r) => setTimeout(r, 5))
      abort.abort(new Error('enough'))
      await expect(batch).rejects.toThrow('enough')
      await expect.poll(() => model.load.usedBlocks).toBe(0)
      await model.dispose()
      await new Promise((r) => setTimeout(r, 10))
      expect(unhandled).toEqual([])
    } finally {
      process.off('unhandledRejection', onUnhandled)
    }
  })

  it('refuses holes in token ids, prompts and messages by index; a bad request never fails the others', async () => {
    const { model } = makeModel()
    const victim = model.generate('abcdef', { maxTokens: 50 })
    // eslint-disable-next-line no-sparse-arrays
    const holey = [1, , 3] as number[]
    await expect(model.generate(holey)).rejects.toThrow('Expected integer between 0 and 31 for prompt[1] but received undefined')
    await expect(model.score('ab', holey)).rejects.toThrow('for completion[1] but received undefined')
    expect(() => model.detokenize(holey)).toThrow('for tokens[1] but received undefined')
    // eslint-disable-next-line no-sparse-arrays
    await expect(model.generateBatch(['ab', , 'cd'] as string[])).rejects.toThrow('for prompts[1] but received undefined')
    // eslint-disable-next-line no-sparse-arrays
    const messages = [{ role: 'user', content: 'ab' }, , { role: 'user', content: 'c' }] as { role: string; content: string }[]
    await expect(model.generate(messages)).rejects.toThrow('Expected chat message {role, content} with string values for prompt[1] but received undefined')
    expect((await victim).tokens).toHaveLength(50)
    await model.dispose()
  })

  it('generateBatch without a seed samples each prompt with a seed of its own; with one, every prompt uses it', async () => {
    const { model } = makeModel()
    const prompts = Array.from({ length: 6 }, () => 'abc')
    const sampled = await model.generateBatch(prompts, { maxTokens: 24, temperature: 1.5 })
    expect(new Set(sampled.map((r) => r.seed)).size).toBe(prompts.length)
    expect(new Set(sampled.map((r) => r.tokens.join())).size).toBeGreaterThan(1)
    // Each result is what generate() gives with the seed it reports.
    const again = await model.generate('abc', { maxTokens: 24, temperature: 1.5, seed: sampled[3]!.seed! })
    expect(again.tokens).toEqual(sampled[3]!.tokens)
    const seeded = await model.generateBatch(prompts, { maxTokens: 24, temperature: 1.5, seed: 11 })
    expect(new Set(seeded.map((r) => `${r.seed} ${r.tokens.join()}`)).size).toBe(1)
    await model.dispose()
  })

  it('refuses holes in stop strings and tool calls by index, before anything runs', async () => {
    const { model } = makeModel()
    // eslint-disable-next-line no-sparse-arrays
    const stop = ['zz', , 'yy'] as string[]
    await expect(model.generate('abc', { maxTokens: 5, stop })).rejects.toThrow('Expected non-empty string for stop[1] but received undefined')
    expect(() => model.stream('abc', { maxTokens: 5, stop })).toThrow('for stop[1] but received undefined')
    // eslint-disable-next-line no-sparse-arrays
    const calls = [{ function: { name: 'f', arguments: '{}' } }, ,] as never
    const messages = [{ role: 'user', content: 'a' }, { role: 'assistant', content: '', tool_calls: calls }]
    expect(() => model.tokenize(messages)).toThrow('for text[1].tool_calls[1] but received undefined')
    expect(model.load.running + model.load.waiting).toBe(0)
    await model.dispose()
  })

  it('stream() throws a request too large at once, not when iterated', () => {
    const { model } = makeModel()
    expect(() => model.stream(Array.from({ length: 4000 }, () => 1), { maxTokens: 100 })).toThrow(RequestTooLargeError)
    expect(() => model.stream(Array.from({ length: 4096 }, () => 1))).toThrow(RequestTooLargeError)
  })

  it("a stream's overlapping next() calls are answered in order; after its error it is done", async () => {
    const { model } = makeModel()
    const alone = await model.generate('abc', { maxTokens: 6 })
    const it = model.stream('abc', { maxTokens: 6 })[Symbol.asyncIterator]()
    const results = await Promise.all(Array.from({ length: 8 }, () => it.next()))
    expect(results.map((r) => (r.done ? null : r.value.token))).toEqual([...alone.tokens, null, null])
    const abort = new AbortController()
    const failing = model.stream('abc', { maxTokens: 400, signal: abort.signal })[Symbol.asyncIterator]()
    await failing.next()
    abort.abort(new Error('stop now'))
    const drain = async () => {
      while (!(await failing.next()).done);
    }
    await expect(drain()).rejects.toThrow('stop now')
    expect(await failing.next()).toEqual({ value: undefined, done: true })
    await model.dispose()
  })

  it("score's options are checked like generate's, and its signal cancels it", async () => {
    const { model } = makeModel()
    await expect(model.score('ab', 'cd', { toplogprobs: 5 } as never)).rejects.toThrow(
      'Expected only the keys chat, chatTemplateVariables, continueFinalMessage, topLogprobs, signal for options but received "toplogprobs" of type string',
    )
    await expect(model.score('ab', 'cd', { chat: 'yes' } as never)).rejects.toThrow('Expected boolean for chat but received "yes" of type string')
    await expect(model.score('ab', '')).rejects.toThrow('Expected text or ids of at least one token for completion but received "" of type string')
    const reason = new Error('not now')
    await expect(model.score('ab', 'cd', { signal: AbortSignal.abort(reason) })).rejects.toBe(reason)
    const abort = new AbortController()
    const long = model.score('a'.repeat(1000), 'b'.repeat(500), { signal: abort.signal })
    abort.abort(reason)
    await expect(long).rejects.toBe(reason)
    await expect.poll(() => model.load.usedBlocks).toBe(0)
    expect(() => model.tokenize('ab', null as never)).toThrow('Expected object for options but received null')
    expect(() => model.tokenize('ab', { chat: 'yes' } as never)).toThrow('Expected boolean for chat but received "yes" of type string')
    await model.dispose()
  })

  it('one signal shared by many requests adds one listener (no leak warning past ten)', async () => {
    const { model } = makeModel()
    const warnings: Error[] = []
    const onWarning = (w: Error) => warnings.push(w)
    process.on('warning', onWarning)
    try {
      const abort = new AbortController()
      const prompts = Array.from({ length: 24 }, (_, i) => 'ab' + 'cdefgh'[i % 6])
      const batch = await model.generateBatch(prompts, { maxTokens: 2, signal: abort.signal })
      const alone = await Promise.all(prompts.map((p) => model.generate(p, { maxTokens: 2, signal: abort.signal })))
      expect(batch.map((r) => r.tokens)).toEqual(alone.map((r) => r.tokens))
      await new Promise((r) => setTimeout(r, 10))
      expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([])
      // While they run, one listener; once they are done, none: a signal that kept a listener
      // would stay alive as long as its sources (the server combines each request's with one that
      // lives as long as the process) and keep what the listener holds.
      const pending = model.generateBatch(prompts, { maxTokens: 2, signal: abort.signal })
      expect(getEventListeners(abort.signal, 'abort')).toHaveLength(1)
      await pending
      await model.score('ab', 'cd', { signal: abort.signal })
      expect(getEventListeners(abort.signal, 'abort')).toHaveLength(0)
    } finally {
      process.off('warning', onWarning)
      await model.dispose()
    }
  })
})

describe('stopTokenIds and ignoreEos', () => {
  it('end a generation at the given ids too, or go on past EOS to maxTokens, with the same tokens before; stopReason names the stop id alone', async () => {
    const forward = new ContextHashModel({ kvBlocks: 512, kvBlockSize: 4, maxBatchTokens: 32, context: 4096 })
    forward.eosBias = 5 // EOS comes within a few tokens
    const model = new Model({ forward, tokenizer: charTokenizer, path: 'context-hash' }, { maxBatchSize: 8, prefillChunkSize: 8 })
    try {
      const ended = await model.generate('to be or', { maxTokens: 64 })
      expect(ended.finishReason).toBe('stop')
      expect(ended.stopReason).toBe(null)
      expect(ended.tokens.at(-1)).toBe(EOS)
      const past = await model.generate('to be or', { maxTokens: ended.tokens.length + 8, ignoreEos: true })
      expect(past.finishReason).toBe('length')
      expect(past.stopReason).toBe(null)
      expect(past.tokens.length).toBe(ended.tokens.length + 8)
      expect(past.tokens.slice(0, ended.tokens.length)).toEqual(ended.tokens)
      expect(past.logprobs.slice(0, ended.tokens.length)).toEqual(ended.logprobs)
      // A stop id ends it at its first occurrence, which stays in the tokens (as EOS does).
      const id = past.tokens.find((t, i) => t !== EOS && i > 0)!
      const at = past.tokens.indexOf(id)
      const stopped = await model.generate('to be or', { maxTokens: past.tokens.length, ignoreEos: true, stopTokenIds: [id] })
      expect(stopped.finishReason).toBe('stop')
      expect(stopped.stopReason).toBe(id)
      expect(stopped.tokens).toEqual(past.tokens.slice(0, at + 1))
      // Its text is left out of the text, as vLLM leaves it out.
      expect(model.detokenize([id])).not.toBe('')
      expect(stopped.text).toBe(model.detokenize(past.tokens.slice(0, at)))
      const streamed: number[] = []
      let streamedText = ''
      const reasons: unknown[] = []
      for await (const piece of model.stream('to be or', { maxTokens: past.tokens.length, ignoreEos: true, stopTokenIds: [id] })) {
        streamed.push(piece.token)
        streamedText += piece.text
        reasons.push(piece.stopReason)
      }
      expect(streamed).toEqual(stopped.tokens)
      expect(streamedText).toBe(stopped.text)
      expect(reasons).toEqual([...streamed.slice(1).map(() => undefined), id])
      // EOS is EOS when stopTokenIds lists it too (null, as vLLM checks EOS first), and a stop id under ignoreEos.
      expect((await model.generate('to be or', { maxTokens: 64, stopTokenIds: [EOS] })).stopReason).toBe(null)
      const eosAsStopId = await model.generate('to be or', { maxTokens: 64, ignoreEos: true, stopTokenIds: [EOS] })
      expect(eosAsStopId.tokens).toEqual(ended.tokens)
      expect(eosAsStopId.stopReason).toBe(EOS)
    } finally {
      await model.dispose()
    }
  })

  it('are checked like the other options', async () => {
    const { model } = makeModel()
    await expect(model.generate('ab', { stopTokenIds: 3 } as never)).rejects.toThrow('Expected array of token ids for stopTokenIds but received 3 of type number')
    await expect(model.generate('ab', { stopTokenIds: [1, 99] })).rejects.toThrow('Expected integer between 0 and 31 for stopTokenIds[1] but received 99 of type number')
    await expect(model.generate('ab', { stopTokenIds: [1, , 2] as number[] })).rejects.toThrow('for stopTokenIds[1] but received undefined')
    await expect(model.generate('ab', { ignoreEos: 'yes' } as never)).rejects.toThrow('Expected boolean for ignoreEos but received "yes" of type string')
    await model.dispose()
  })
})

describe('responseFormat: a grammar still being built', () => {
  /** A grammar source whose grammars come when the test releases them, and which counts what it hands out and gets back. */
  function slowGrammars() {
    const pending: (() => void)[] = []
    const made = { built: 0, disposed: 0 }
    const grammars: ConstraintSource = {
      constrain: () =>
        new Promise((resolve) =>
          pending.push(() => {
            made.built++
            resolve({ mask: async () => new Int32Array(1).fill(-1), accept() {}, finished: false, dispose: () => void made.disposed++ })
          }),
        ),
      dispose() {},
    }
    return { grammars, pending, made }
  }

  it('an abort or a cancel ends the generation at once; the grammar, when it comes, is disposed of unused', async () => {
    const { grammars, pending, made } = slowGrammars()
    const forward = new ContextHashModel({ kvBlocks: 64, kvBlockSize: 4, maxBatchTokens: 32, context: 4096 })
    const model = new Model({ forward, tokenizer: charTokenizer, path: 'slow-grammars', grammars }, { maxBatchSize: 4, prefillChunkSize: 8 })
    try {
      const abort = new AbortController()
      const generation = model.generate('ab', { maxTokens: 4, responseFormat: { type: 'json_object' }, signal: abort.signal })
      abort.abort(new Error('stop now'))
      await expect(generation).rejects.toThrow('stop now')
      const pieces: unknown[] = []
      const iterator = model.stream('ab', { maxTokens: 4, responseFormat: { type: 'json_object' } })[Symbol.asyncIterator]()
      const first = iterator.next()
      await iterator.return!()
      await expect(first).rejects.toThrow('cancelled while its grammar was built')
      expect(pieces).toEqual([])
      expect(made.built).toBe(0)
      for (const release of pending.splice(0)) release()
      await new Promise((r) => setTimeout(r, 0))
      expect(made).toEqual({ built: 2, disposed: 2 })
      expect(forward.steps.length).toBe(0)
    } finally {
      await model.dispose()
    }
  })

  it('generateBatch checks and compiles its responseFormat once, not once per prompt', async () => {
    const model = await loadModel(undefined, { device: 'cpu', maxBatchSize: 4 })
    try {
      await model.checkResponseFormat({ type: 'json_object' }) // the engine takes the vocabulary
      type Internals = { parts: { grammars: { built: { compiler: { compileJSONSchema(...args: unknown[]): unknown } } } } }
      const compiles = vi.spyOn((model as unknown as Internals).parts.grammars.built.compiler, 'compileJSONSchema')
      const posts = vi.spyOn(EvalWorker.prototype, 'post')
      const checks = () => posts.mock.calls.filter(([message]) => (message as { kind?: string }).kind === 'json_schema').length
      const responseFormat = { type: 'json_schema', schema: { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'] } } as const
      const prompts = ['To be', 'or not', 'to be', 'that is']
      const batch = await model.generateBatch(prompts, { maxTokens: 12, responseFormat })
      expect(checks()).toBe(1)
      expect(compiles).toHaveBeenCalledTimes(1)
      for (const [i, prompt] of prompts.entries()) expect(batch[i]!.text).toBe((await model.generate(prompt, { maxTokens: 12, responseFormat })).text)
      expect(checks()).toBe(1)
      expect(compiles).toHaveBeenCalledTimes(1)
    } finally {
      vi.restoreAllMocks()
      await model.dispose()
    }
  })

  it("a dispose while the grammar is checked or built rejects with the model's DisposedError, as every other request", async () => {
    const model = await loadModel(undefined, { device: 'cpu', maxBatchSize: 2 })
    const responseFormat = { type: 'json_schema', schema: { type: 'object', properties: { n: { type: 'integer' } } } } as const
    const generation = model.generate('ab', { maxTokens: 4, responseFormat })
    const streamed = model.stream('ab', { maxTokens: 4, responseFormat })[Symbol.asyncIterator]().next()
    const checked = model.checkResponseFormat({ type: 'regex', pattern: '[a-z]+' })
    // JSON mode is not checked in the worker: its grammar is built with the model's vocabulary at once.
    const object = model.generate('ab', { maxTokens: 4, responseFormat: { type: 'json_object' } })
    await model.dispose()
    for (const outcome of await Promise.allSettled([generation, streamed, checked, object])) {
      expect(outcome.status).toBe('rejected')
      expect((outcome as PromiseRejectedResult).reason).toBeInstanceOf(DisposedError)
      expect((outcome as PromiseRejectedResult).reason.message).toBe('The model was disposed and cannot be used any more')
    }
  })
})
