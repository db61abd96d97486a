// Conversations as prompts: an array of {role, content} messages goes through the model's chat
// template (here the shipped model's ChatML) up to the assistant's turn.
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath, loadModel, type Model } from '../../lib/api.js'
import { DisposedError } from '../../lib/errors.js'
import { THINKING_TEMPLATE } from '../helpers/templates.js'

let model: Model

beforeAll(async () => {
  model = await loadModel(defaultModelPath, { device: 'cpu', maxBatchSize: 4 })
})

afterAll(() => model.dispose())

describe('the shipped model', () => {
  it('is what loadModel() loads without a directory', async () => {
    const shipped = await loadModel(undefined, { device: 'cpu' })
    try {
      expect(shipped.path).toBe(defaultModelPath)
      const a = await shipped.generate('ROMEO:', { maxTokens: 8 })
      const b = await model.generate('ROMEO:', { maxTokens: 8 })
      expect(a.tokens).toEqual(b.tokens)
    } finally {
      await shipped.dispose()
    }
  })
})

describe('tokenizeAsync', () => {
  it('gives the ids tokenize() gives, for text, chat text and messages, and checks its arguments', async () => {
    const conversation = [
      { role: 'system', content: 'Speak as a king.' },
      { role: 'user', content: 'Who art thou?' },
    ]
    expect(await model.tokenizeAsync('ROMEO: naïve 🙂')).toEqual(model.tokenize('ROMEO: naïve 🙂'))
    expect(await model.tokenizeAsync('Who art thou?', { chat: true })).toEqual(model.tokenize('Who art thou?', { chat: true }))
    expect(await model.tokenizeAsync(conversation, { signal: new AbortController().signal, timeoutMs: 5000 })).toEqual(model.tokenize(conversation))
    await expect(model.tokenizeAsync(7 as never)).rejects.toThrow('Expected string or array of chat messages for text but received 7 of type number')
    await expect(model.tokenizeAsync([{ role: 'user' }] as never)).rejects.toThrow(
      'Expected chat message {role, content} with string values for text[0] but received {"role":"user"} of type object',
    )
    for (const bad of [[], [1, 2, 3]] as unknown[][]) {
      const message = bad.length ? 'Expected chat message {role, content} with string values for text[0] but received 1' : 'Expected string or non-empty array of chat messages for text but received []'
      expect(() => model.tokenize(bad as never)).toThrow(message)
      await expect(model.tokenizeAsync(bad as never)).rejects.toThrow(message)
    }
    await expect(model.tokenizeAsync('x', { timeoutMs: 0 })).rejects.toThrow('Expected integer between 1 and 2147483647 for timeoutMs but received 0')
    await expect(model.tokenizeAsync('x', { chat: 1 } as never)).rejects.toThrow('Expected boolean for chat but received 1 of type number')
    await expect(model.tokenizeAsync('x', { wait: 1 } as never)).rejects.toThrow('wait')
    const reason = new Error('gone')
    await expect(model.tokenizeAsync('x', { signal: AbortSignal.abort(reason) })).rejects.toBe(reason)
    expect(await model.tokenizeAsync('ROMEO:', { addSpecialTokens: false })).toEqual(model.tokenize('ROMEO:', { addSpecialTokens: false }))
    const withChat = 'Expected nothing (with chat messages or chat: true, the chat template places its own special tokens) for addSpecialTokens but received false'
    expect(() => model.tokenize('x', { chat: true, addSpecialTokens: false })).toThrow(withChat)
    expect(() => model.tokenize(conversation, { addSpecialTokens: false })).toThrow(withChat)
    await expect(model.tokenizeAsync(conversation, { addSpecialTokens: false })).rejects.toThrow(withChat)
  })

  it('names the special tokens and gives the chat template', () => {
    expect(model.specialTokens).toMatchObject({ eos_token: '<|endoftext|>' })
    expect(model.chatTemplate).toContain('<|im_start|>')
  })

  it('stops its worker thread on dispose: what waits rejects with a DisposedError, as every other call does', async () => {
    const own = await loadModel(defaultModelPath, { device: 'cpu' })
    const pending = own.tokenizeAsync('ROMEO: '.repeat(40_000))
    const queued = own.tokenizeAsync('ROMEO:', { chat: true })
    await own.dispose()
    for (const p of [pending, queued]) await expect(p).rejects.toBeInstanceOf(DisposedError)
    await expect(own.tokenizeAsync('x')).rejects.toThrow('The model was disposed and cannot be used any more')
  })
})

describe('chat messages as the prompt', () => {
  it('one user message is the same request as text with chat: true', async () => {
    const messages = await model.generate([{ role: 'user', content: 'Who art thou?' }], { maxTokens: 12 })
    const text = await model.generate('Who art thou?', { maxTokens: 12, chat: true })
    expect(messages.tokens).toEqual(text.tokens)
    expect(Float32Array.from(messages.logprobs)).toEqual(Float32Array.from(text.logprobs))
  })

  it('a conversation is rendered by the template, ending with the assistant turn', async () => {
    const conversation = [
      { role: 'system', content: 'Speak as a king.' },
      { role: 'user', content: 'Who art thou?' },
      { role: 'assistant', content: 'A man.' },
      { role: 'user', content: 'What man?' },
    ]
    const rendered =
      '<|im_start|>system\nSpeak as a king.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n' +
      '<|im_start|>assistant\nA man.<|im_end|>\n<|im_start|>user\nWhat man?<|im_end|>\n<|im_start|>assistant\n'
    const ids = model.tokenize(rendered)
    const [fromMessages, fromIds] = await model.generateBatch([conversation, ids], { maxTokens: 10 })
    expect(fromMessages!.timings.promptTokens).toBe(ids.length)
    expect(fromMessages!.tokens).toEqual(fromIds!.tokens)
    const streamed: number[] = []
    for await (const piece of model.stream(conversation, { maxTokens: 10 })) streamed.push(piece.token)
    expect(streamed).toEqual(fromIds!.tokens)
    const scored = await model.score(conversation, fromIds!.tokens)
    expect(Float32Array.from(scored.logprobs)).toEqual(Float32Array.from(fromIds!.logprobs))
  })

  it('continueFinalMessage ends the prompt inside the last assistant message, so that generation continues its text', async () => {
    const conversation = [
      { role: 'user', content: 'Who art thou?' },
      { role: 'assistant', content: 'I am a' },
    ]
    const rendered = '<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\nI am a'
    const ids = model.tokenize(rendered)
    expect(model.tokenize(conversation, { continueFinalMessage: true })).toEqual(ids)
    expect(await model.tokenizeAsync(conversation, { continueFinalMessage: true })).toEqual(ids)
    const continued = await model.generate(conversation, { maxTokens: 8, continueFinalMessage: true })
    expect(continued.tokens).toEqual((await model.generate(ids, { maxTokens: 8 })).tokens)
    const scored = await model.score(conversation, continued.tokens, { continueFinalMessage: true })
    expect(Float32Array.from(scored.logprobs)).toEqual(Float32Array.from(continued.logprobs))
    const last = "true only for chat messages whose last is the assistant's (the text to continue) for continueFinalMessage but received true"
    await expect(model.generate([{ role: 'user', content: 'hi' }], { continueFinalMessage: true })).rejects.toThrow(last)
    await expect(model.generate('hi', { chat: true, continueFinalMessage: true })).rejects.toThrow(last)
    expect(() => model.tokenize('hi', { continueFinalMessage: true })).toThrow(last)
    await expect(model.generate(conversation, { continueFinalMessage: 'yes' } as never)).rejects.toThrow('Expected boolean for continueFinalMessage but received "yes" of type string')
  })

  it("continueFinalMessage ends the prompt at the last message's text when the end-of-turn marker holds it too, or when it is empty", async () => {
    const start = '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    for (const content of ['m', 'end|>', '\n', ' ', ''])
      expect(model.tokenize([{ role: 'user', content: 'Hi' }, { role: 'assistant', content }], { continueFinalMessage: true })).toEqual(model.tokenize(start + content))
  })

  it('rejects malformed messages with the element that is wrong', async () => {
    await expect(model.generate([{ role: 'user', content: 'hi' }, { role: 'user' }] as never)).rejects.toThrow(
      'Expected chat message {role, content} with string values for prompt[1] but received {"role":"user"} of type object',
    )
    await expect(model.generateBatch(['ok', [{ content: 'x' }]] as never)).rejects.toThrow('for prompts[1][0]')
  })
})

describe('chat template variables', () => {
  const TEMPLATE = THINKING_TEMPLATE
  let dir: string
  let thinking: Model

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'detinfer-template-variables-'))
    cpSync(defaultModelPath, dir, { recursive: true })
    writeFileSync(join(dir, 'chat_template.jinja'), TEMPLATE)
    thinking = await loadModel(dir, { device: 'cpu', maxBatchSize: 4 })
  })
  afterAll(async () => {
    await thinking?.dispose()
    rmSync(dir, { recursive: true, force: true })
  })

  const messages = [{ role: 'user', content: 'Who art thou?' }]
  const off = { chatTemplateVariables: { enable_thinking: false } }

  it('reach the template in every call that takes a conversation or chat: true', async () => {
    const plain = thinking.tokenize(messages)
    const closed = thinking.tokenize(messages, off)
    expect(thinking.detokenize(closed.slice(plain.length))).toBe('<think>\n\n</think>\n\n')
    expect(thinking.tokenize('Who art thou?', { chat: true, ...off })).toEqual(closed)
    expect(await thinking.tokenizeAsync(messages, off)).toEqual(closed)
    expect(await thinking.tokenizeAsync('Who art thou?', { chat: true, ...off })).toEqual(closed)
    const generated = await thinking.generate(messages, { maxTokens: 6, ...off })
    expect(generated.timings.promptTokens).toBe(closed.length)
    expect(generated.tokens).toEqual((await thinking.generate(closed, { maxTokens: 6 })).tokens)
    const [batched] = await thinking.generateBatch([messages], { maxTokens: 6, ...off })
    expect(batched!.tokens).toEqual(generated.tokens)
    const streamed: number[] = []
    for await (const piece of thinking.stream(messages, { maxTokens: 6, ...off })) streamed.push(piece.token)
    expect(streamed).toEqual(generated.tokens)
    const scored = await thinking.score(messages, generated.tokens, off)
    expect(Float32Array.from(scored.logprobs)).toEqual(Float32Array.from(generated.logprobs))
  })

  it("loadModel's chatTemplate replaces the model's template", async () => {
    const given = await loadModel(defaultModelPath, { device: 'cpu', chatTemplate: TEMPLATE })
    try {
      expect(given.chatTemplate).toBe(TEMPLATE)
      expect(given.tokenize(messages, off)).toEqual(thinking.tokenize(messages, off))
      expect(given.tokenize(messages, off)).not.toEqual(model.tokenize(messages, off))
    } finally {
      await given.dispose()
    }
    await expect(loadModel(defaultModelPath, { device: 'cpu', chatTemplate: '{% for %}' })).rejects.toThrow('Could not parse the chat template given to loadModel: ')
    await expect(loadModel(defaultModelPath, { device: 'cpu', chatTemplate: 7 as never })).rejects.toThrow(
      'Expected string (the Jinja source of a chat template) for chatTemplate but received 7 of type number',
    )
  })

  it('continueFinalMessage needs a template that writes the message as it is', async () => {
    const upper = await loadModel(defaultModelPath, { device: 'cpu', chatTemplate: "{% for m in messages %}{{ m.role }}: {{ m.content | trim | upper }}\n{% endfor %}" })
    try {
      const conversation = [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: 'well met' },
      ]
      expect(() => upper.tokenize(conversation, { continueFinalMessage: true })).toThrow(
        "does not write the last message's text as it is (it changes it), so the message cannot be continued",
      )
      // Whitespace the template trims is not a change: the message's trimmed text is found.
      expect(upper.detokenize(upper.tokenize([{ role: 'user', content: 'hi' }, { role: 'assistant', content: ' WELL ' }], { continueFinalMessage: true }))).toBe('user: HI\nassistant: WELL')
    } finally {
      await upper.dispose()
    }
  })

  it('continueFinalMessage continues the last message when a template that trims it leaves its text as given only in an earlier one', async () => {
    const trims = await loadModel(defaultModelPath, { device: 'cpu', chatTemplate: '{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}' })
    try {
      const conversation = [
        { role: 'user', content: "Start with 'Answer: ' and go on" },
        { role: 'assistant', content: 'Answer: ' },
      ]
      expect(trims.detokenize(trims.tokenize(conversation, { continueFinalMessage: true }))).toBe("user: Start with 'Answer: ' and go on\nassistant: Answer:")
      // Trailing whitespace the template writes stays.
      const kept = await loadModel(defaultModelPath, { device: 'cpu', chatTemplate: '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}' })
      try {
        expect(kept.detokenize(kept.tokenize(conversation, { continueFinalMessage: true }))).toBe("user: Start with 'Answer: ' and go on\nassistant: Answer: ")
      } finally {
        await kept.dispose()
      }
    } finally {
      await trims.dispose()
    }
  })

  it('are refused where no template renders, and may not set what the request sets', async () => {
    const nothing = 'Expected nothing unless the prompt is chat messages or chat is true for chatTemplateVariables but received {"enable_thinking":false}'
    expect(() => thinking.tokenize('text', off)).toThrow(nothing)
    await expect(thinking.tokenizeAsync('text', off)).rejects.toThrow(nothing)
    await expect(thinking.generate('text', off)).rejects.toThrow(nothing)
    await expect(thinking.generate([1, 2, 3], off)).rejects.toThrow(nothing)
    await expect(thinking.score('text', 'more', off)).rejects.toThrow(nothing)
    await expect(thinking.generate(messages, { chatTemplateVariables: 'x' as never })).rejects.toThrow(
      'Expected plain object of template variables for chatTemplateVariables but received "x" of type string',
    )
    expect(() => thinking.tokenize(messages, { chatTemplateVariables: { messages: [] } })).toThrow(
      'Expected nothing (the messages and the generation prompt are given by the request) for chatTemplateVariables.messages but received [] of type array',
    )
    await expect(thinking.generate(messages, { chatTemplateVariables: { add_generation_prompt: false } })).rejects.toThrow('for chatTemplateVariables.add_generation_prompt')
  })
})
