// Conversations as prompts: an array of {role, content} messages goes through the model's chat
// template (here the shipped model's ChatML) up to the assistant's turn.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath, loadModel, type Model } from '../../lib/api.js'

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

  it('stops its worker thread on dispose', async () => {
    const own = await loadModel(defaultModelPath, { device: 'cpu' })
    const pending = own.tokenizeAsync('ROMEO: '.repeat(40_000))
    await own.dispose()
    await expect(pending).rejects.toThrow('The tokenizer was closed before the text was encoded')
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

  it('rejects malformed messages with the element that is wrong', async () => {
    await expect(model.generate([{ role: 'user', content: 'hi' }, { role: 'user' }] as never)).rejects.toThrow(
      'Expected chat message {role, content} with string values for prompt[1] but received {"role":"user"} of type object',
    )
    await expect(model.generateBatch(['ok', [{ content: 'x' }]] as never)).rejects.toThrow('for prompts[1][0]')
  })
})
