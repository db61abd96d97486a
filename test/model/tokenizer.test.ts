// The tokenizer on a byte-level BPE tokenizer.json written by the test: encode/decode, BOS and EOS
// from the config files, special tokens, the chat template, and streaming detokenization.
import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ChatTemplate, MAX_RENDERED_CHARS, parseJsonKeepingFloats, RENDER_TIMEOUT_MS } from '../../lib/chat-template.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import { buildDist } from '../helpers/server.js'
import { byteSymbols, SPECIAL_TOKENS, writeTinyModel } from '../helpers/tiny-model.js'
import { BACKTRACKING_NORMALIZER } from '../helpers/templates.js'

let root: string
const repoRoot = join(import.meta.dirname, '..', '..')
let llamaDir: string
let qwenDir: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-tokenizer-'))
  llamaDir = writeTinyModel(join(root, 'llama'), { architecture: 'LlamaForCausalLM', numLayers: 1 }).dir
  qwenDir = writeTinyModel(join(root, 'qwen'), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

const symbols = byteSymbols()
/** The byte-level ids of a text with no merges applied (ids 0..255 are the bytes). */
const bytesOf = (text: string) => Array.from(Buffer.from(text, 'utf8'))
const specialId = (token: string) => 256 + 9 + SPECIAL_TOKENS.indexOf(token)

describe('tokenizer', () => {
  it('encodes with the byte-level BPE merges and decodes back', async () => {
    const t = await Tokenizer.load(qwenDir)
    // "the" -> 'Ġt'+'he' -> 'Ġthe' (merge 2); "a" alone after a space -> 'Ġa'.
    const ids = t.encode('x the a', { addSpecialTokens: false })
    expect(ids).toEqual([symbols.indexOf('x'), 258, 259])
    expect(t.decode(ids)).toBe('x the a')
    const text = 'naïve café, 日本語 🙂\n\ttabs  and  spaces'
    expect(t.decode(t.encode(text))).toBe(text)
    expect(t.vocabSize).toBe(256 + 9 + SPECIAL_TOKENS.length)
  })

  it('adds BOS as tokenizer_config.json says', async () => {
    const llama = await Tokenizer.load(llamaDir)
    const qwen = await Tokenizer.load(qwenDir)
    const bos = specialId('<s>')
    expect([llama.addsBos, llama.bosTokenId, llama.bosToken]).toEqual([true, bos, '<s>'])
    expect(llama.encode('hi')).toEqual([bos, ...bytesOf('hi')])
    expect(llama.encode('hi', { addSpecialTokens: false })).toEqual(bytesOf('hi'))
    expect(llama.encode('<s>hi')).toEqual([bos, ...bytesOf('hi')]) // not twice
    expect(qwen.addsBos).toBe(false)
    expect(qwen.encode('hi')).toEqual(bytesOf('hi'))
  })

  it('follows a TemplateProcessing post-processor when add_bos_token is absent', async () => {
    const dir = writeTinyModel(join(root, 'template'), { architecture: 'LlamaForCausalLM', numLayers: 1 }).dir
    const cfgFile = join(dir, 'tokenizer_config.json')
    const { add_bos_token: _, ...cfg } = JSON.parse(readFileSync(cfgFile, 'utf8'))
    writeFileSync(cfgFile, JSON.stringify(cfg))
    const tokFile = join(dir, 'tokenizer.json')
    const tok = JSON.parse(readFileSync(tokFile, 'utf8'))
    const bos = specialId('<s>')
    tok.post_processor = {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<s>': { id: '<s>', ids: [bos], tokens: ['<s>'] } },
    }
    writeFileSync(tokFile, JSON.stringify(tok))
    const t = await Tokenizer.load(dir)
    expect(t.addsBos).toBe(true)
    expect(t.encode('ok')).toEqual([bos, ...bytesOf('ok')])
    // add_bos_token: false wins over the post-processor.
    writeFileSync(cfgFile, JSON.stringify({ ...cfg, add_bos_token: false }))
    const noBos = await Tokenizer.load(dir)
    expect(noBos.encode('ok')).toEqual(bytesOf('ok'))
  })

  it('takes EOS ids from generation_config.json, then tokenizer_config.json', async () => {
    const t = await Tokenizer.load(qwenDir)
    expect(t.eosTokenIds).toEqual([specialId('<|endoftext|>'), specialId('<|im_end|>'), specialId('</s>')])
    expect(t.eosToken).toBe('</s>')
    const dir = writeTinyModel(join(root, 'no-gen'), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    unlinkSync(join(dir, 'generation_config.json'))
    expect((await Tokenizer.load(dir)).eosTokenIds).toEqual([specialId('</s>')])
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: specialId('<|im_end|>') }))
    expect((await Tokenizer.load(dir)).eosTokenIds).toEqual([specialId('<|im_end|>'), specialId('</s>')])
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: 'x' }))
    await expect(Tokenizer.load(dir)).rejects.toThrow(
      `Expected a token id below 16777216 or an array of them (the largest vocabulary detinfer loads) for eos_token_id in ${join(dir, 'generation_config.json')} but received "x" of type string`,
    )
    // The bound is the model's vocab_size, named, not the tokenizer's largest id (models pad).
    const limits = { modelVocabSize: 300, modelConfigFile: join(dir, 'config.json') }
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [specialId('<|im_end|>'), 290] }))
    expect((await Tokenizer.load(dir, limits)).eosTokenIds).toEqual([specialId('<|im_end|>'), 290, specialId('</s>')])
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [300] }))
    await expect(Tokenizer.load(dir, limits)).rejects.toThrow(
      `Expected a token id below 300 or an array of them (vocab_size in ${join(dir, 'config.json')}) for eos_token_id in ${join(dir, 'generation_config.json')} but received [300] of type array`,
    )
  })

  it("takes config.json's eos_token_id when generation_config.json gives none, as Hugging Face does", async () => {
    const dir = writeTinyModel(join(root, 'config-eos'), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    unlinkSync(join(dir, 'generation_config.json'))
    const fromModel = { modelEosTokenIds: [specialId('<|endoftext|>'), specialId('<|im_end|>')] }
    expect((await Tokenizer.load(dir, fromModel)).eosTokenIds).toEqual([specialId('<|endoftext|>'), specialId('<|im_end|>'), specialId('</s>')])
    // A generation config without eos_token_id: config.json's still.
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ do_sample: false }))
    expect((await Tokenizer.load(dir, fromModel)).eosTokenIds).toEqual([specialId('<|endoftext|>'), specialId('<|im_end|>'), specialId('</s>')])
    // One with its own: only those (and tokenizer_config's eos_token).
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: specialId('<|im_end|>') }))
    expect((await Tokenizer.load(dir, fromModel)).eosTokenIds).toEqual([specialId('<|im_end|>'), specialId('</s>')])
  })

  it('keeps special tokens whole and skips them on request', async () => {
    const t = await Tokenizer.load(qwenDir)
    const ids = t.encode('<|im_start|>user\nhi<|im_end|>', { addSpecialTokens: false })
    expect(ids).toEqual([specialId('<|im_start|>'), ...t.encode('user\nhi', { addSpecialTokens: false }), specialId('<|im_end|>')])
    expect(t.decode(ids, { skipSpecialTokens: false })).toBe('<|im_start|>user\nhi<|im_end|>')
    expect(t.decode(ids)).toBe('user\nhi')
    expect(t.decode([])).toBe('')
  })

  it('renders the chat template', async () => {
    const t = await Tokenizer.load(qwenDir)
    expect(t.hasChatTemplate).toBe(true)
    const text = t.applyChatTemplate([{ role: 'user', content: 'Who art thou?' }])
    expect(text).toBe('<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n')
    expect(t.applyChatTemplate([{ role: 'user', content: 'x' }], { addGenerationPrompt: false })).toBe('<|im_start|>user\nx<|im_end|>\n')
    expect(t.encodePrompt('Who art thou?', true)).toEqual(t.encode(text, { addSpecialTokens: false }))
    expect(t.encodePrompt('Who', false)).toEqual(t.encode('Who'))
    expect(t.encodeContinuation(' art')).toEqual(t.encode(' art', { addSpecialTokens: false }))
  })

  it('streams only complete UTF-8 text', async () => {
    const t = await Tokenizer.load(qwenDir)
    const text = 'the café 🙂 naïve 日本'
    const ids = t.encode(text, { addSpecialTokens: false })
    const stream = t.streamDecoder()
    const pieces = ids.map((id) => stream.push(id))
    pieces.push(stream.flush())
    expect(pieces.join('')).toBe(text)
    expect(pieces.some((p) => p.includes('\uFFFD'))).toBe(false)
    // The 4 bytes of 🙂 give nothing for 3 tokens, then the whole character.
    const emoji = t.encode('🙂', { addSpecialTokens: false })
    expect(emoji).toHaveLength(4)
    const s2 = t.streamDecoder()
    expect(emoji.map((id) => s2.push(id))).toEqual(['', '', '', '🙂'])
  })

  it('streams a continuation with the spaces the context implies, and flushes an incomplete character', async () => {
    const t = await Tokenizer.load(qwenDir)
    const context = t.encode('x the', { addSpecialTokens: false })
    const next = t.encode(' a café', { addSpecialTokens: false })
    const s = t.streamDecoder({ context })
    expect(next.map((id) => s.push(id)).join('') + s.flush()).toBe(' a café')
    const half = t.streamDecoder()
    expect(half.push(bytesOf('é')[0]!)).toBe('')
    expect(half.flush()).toBe('\uFFFD')
  })

  it('reports bad input and missing files', async () => {
    const t = await Tokenizer.load(qwenDir)
    expect(() => t.decode([1, 9999])).toThrow('Expected an integer between 0 and 269 for ids[1] but received 9999 of type number')
    expect(() => t.encode(5 as never)).toThrow('Expected a string for text but received 5 of type number')
    await expect(Tokenizer.load(join(root, 'none'))).rejects.toThrow(`tokenizer.json not found: ${join(root, 'none', 'tokenizer.json')} does not exist`)
    const dir = writeTinyModel(join(root, 'no-template'), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    const cfg = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8'))
    delete cfg.chat_template
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify(cfg))
    const plain = await Tokenizer.load(dir)
    expect(plain.hasChatTemplate).toBe(false)
    expect(() => plain.applyChatTemplate([{ role: 'user', content: 'x' }])).toThrow('This model has no chat template')
    // chat_template.jinja beside the config (newer checkpoints) is read too.
    writeFileSync(join(dir, 'chat_template.jinja'), '{{ messages[0].content }}!')
    expect((await Tokenizer.load(dir)).applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('x!')
    // And it wins over tokenizer_config.json's, as transformers reads them.
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: '{{ messages[0].content }}?' }))
    expect((await Tokenizer.load(dir)).applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('x!')
    unlinkSync(join(dir, 'chat_template.jinja'))
    expect((await Tokenizer.load(dir)).applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('x?')
  })
})

describe('tokenizer files that would hang or mislead', () => {
  let count = 0
  const fresh = () => writeTinyModel(join(root, `bad${count++}`), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
  const editJson = (file: string, edit: (json: Record<string, any>) => void) => {
    const json = JSON.parse(readFileSync(file, 'utf8'))
    edit(json)
    writeFileSync(file, JSON.stringify(json))
  }

  it('checks token ids against the vocabulary before the tokenizer library sees them', async () => {
    const dir = fresh()
    const file = join(dir, 'tokenizer.json')
    const original = readFileSync(file, 'utf8')
    editJson(file, (t) => (t.model.vocab['x'] = 2_000_000_000))
    const started = performance.now()
    await expect(Tokenizer.load(dir)).rejects.toThrow(
      `Expected a token id below 16777216 (the largest vocabulary detinfer loads) for model.vocab["x"] in ${file} but received 2000000000 of type number`,
    )
    await expect(Tokenizer.load(dir, { modelVocabSize: 273, modelConfigFile: 'm/config.json' })).rejects.toThrow(
      `Expected a token id below 273 (vocab_size in m/config.json) for model.vocab["x"] in ${file} but received 2000000000 of type number`,
    )
    writeFileSync(file, original)
    editJson(file, (t) => (t.added_tokens[1].id = 2e9))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for added_tokens[1].id in ${file} but received 2000000000 of type number`)
    expect(performance.now() - started).toBeLessThan(2000)
    editJson(file, (t) => (t.added_tokens[1].id = -1))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for added_tokens[1].id in ${file} but received -1 of type number`)
    editJson(file, (t) => (t.added_tokens[1].id = 'three'))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for added_tokens[1].id in ${file} but received "three" of type string`)
  })

  it('refuses a tokenizer larger than its model', async () => {
    // The tiny tokenizer's ids run to 269; a model of 200 ids cannot embed them.
    await expect(Tokenizer.load(qwenDir, { modelVocabSize: 200, modelConfigFile: 'm/config.json' })).rejects.toThrow(
      /^Expected a token id below 200 \(vocab_size in m\/config\.json\) for model\.vocab\[".+"\] in .*tokenizer\.json but received 2\d\d of type number$/,
    )
    expect((await Tokenizer.load(qwenDir, { modelVocabSize: 270 })).vocabSize).toBe(270)
  })

  it('says what is wrong with a null or malformed model', async () => {
    const dir = fresh()
    const file = join(dir, 'tokenizer.json')
    const original = readFileSync(file, 'utf8')
    editJson(file, (t) => (t.model = null))
    await expect(Tokenizer.load(dir)).rejects.toThrow(
      `Expected an object describing the tokenizer model ({type, vocab, ...}) for model in ${file} but received null`,
    )
    writeFileSync(file, original)
    editJson(file, (t) => (t.model.vocab = 7))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for model.vocab in ${file} but received 7 of type number`)
    writeFileSync(file, original)
    editJson(file, (t) => (t.added_tokens = { a: 1 }))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected an array of {id, content} for added_tokens in ${file} but received {"a":1} of type object`)
    writeFileSync(file, '[]')
    await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected a JSON object for the tokenizer in ${file} but received [] of type array`)
  })

  it('tries the tokenizer once at load, so that a broken component fails there, naming the file', async () => {
    const dir = fresh()
    const file = join(dir, 'tokenizer.json')
    editJson(file, (t) => (t.post_processor = { type: 'TemplateProcessing', single: 5 }))
    await expect(Tokenizer.load(dir)).rejects.toThrow(
      `${file} does not work: encoding and decoding a test text failed; check its normalizer, pre_tokenizer, post_processor and decoder (the tokenizer library said: `,
    )
    editJson(file, (t) => {
      t.post_processor = null
      t.model.merges = 'x'
    })
    await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected an array of merges ("a b" or ["a", "b"]) for model.merges in ${file} but received "x" of type string`)
  })

  it('refuses out-of-range special ids in generation_config.json and tokenizer_config.json', async () => {
    const dir = fresh()
    const gen = join(dir, 'generation_config.json')
    writeFileSync(gen, JSON.stringify({ eos_token_id: 1e9 }))
    await expect(Tokenizer.load(dir, { modelVocabSize: 273 })).rejects.toThrow(
      `Expected a token id below 273 or an array of them (vocab_size in config.json) for eos_token_id in ${gen} but received 1000000000 of type number`,
    )
    writeFileSync(gen, JSON.stringify({ pad_token_id: 1e9 }))
    await expect(Tokenizer.load(dir, { modelVocabSize: 273 })).rejects.toThrow(
      `Expected a token id below 273 or an array of them (vocab_size in config.json) for pad_token_id in ${gen} but received 1000000000 of type number`,
    )
    writeFileSync(gen, JSON.stringify({ bos_token_id: -3 }))
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for bos_token_id in ${gen} but received -3 of type number`)
    unlinkSync(gen)
    const cfg = join(dir, 'tokenizer_config.json')
    editJson(cfg, (c) => (c.added_tokens_decoder = { '1000000000': { content: '<x>' } }))
    await expect(Tokenizer.load(dir, { modelVocabSize: 273 })).rejects.toThrow(
      `Expected a token id below 273 (vocab_size in config.json) for the key "1000000000" of added_tokens_decoder in ${cfg} but received 1000000000 of type number`,
    )
    editJson(cfg, (c) => {
      delete c.added_tokens_decoder
      c.eos_token_id = 1e9
    })
    await expect(Tokenizer.load(dir)).rejects.toThrow(`for eos_token_id in ${cfg} but received 1000000000 of type number`)
  })

  it("refuses the kernel's files (/proc, /sys) in place of a model file, and loads a million EOS ids without recursion", async () => {
    const dir = fresh()
    const template = join(dir, 'chat_template.jinja')
    symlinkSync('/proc/self/environ', template)
    await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected a regular file for chat_template.jinja but ${template} is a kernel file (/proc/`)
    unlinkSync(template)
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: new Array(1_000_000).fill(0) }))
    expect((await Tokenizer.load(dir)).eosTokenIds.length).toBeGreaterThanOrEqual(1_000_000)
  })

  it('reads only regular files', async () => {
    const dir = fresh()
    const file = join(dir, 'tokenizer.json')
    rmSync(file)
    mkdirSync(file)
    await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected a regular file for tokenizer.json but ${file} is a directory`)
    rmSync(file, { recursive: true })
    if (spawnSync('mkfifo', [file]).status === 0)
      await expect(Tokenizer.load(dir)).rejects.toThrow(`Expected a regular file for tokenizer.json but ${file} is a FIFO (named pipe)`)
    const other = fresh()
    mkdirSync(join(other, 'chat_template.jinja'))
    await expect(Tokenizer.load(other)).rejects.toThrow(`Expected a regular file for chat_template.jinja but ${join(other, 'chat_template.jinja')} is a directory`)
  })
})

describe('encoding off the calling thread', () => {
  const texts = ['hi', '<s>hi', 'x the a', 'naïve café, 日本語 🙂\n\ttabs  and  spaces', '<|im_start|>user\nhi<|im_end|>', 'the '.repeat(20_000)]

  it('gives the ids encode() gives, in the order asked, BOS and chat template included', async () => {
    for (const dir of [qwenDir, llamaDir]) {
      const t = await Tokenizer.load(dir)
      const asked = texts.flatMap((text) => [
        t.encodeAsync(text),
        t.encodeAsync(text, { addSpecialTokens: false }),
        t.encodeChatAsync([{ role: 'user', content: text }]),
      ])
      const got = await Promise.all(asked)
      expect(got).toEqual(texts.flatMap((text) => [t.encode(text), t.encode(text, { addSpecialTokens: false }), t.encodePrompt(text, true)]))
      expect(await t.encodeChatAsync([{ role: 'user', content: 'Who art thou?' }])).toEqual(t.encodeChat([{ role: 'user', content: 'Who art thou?' }]))
      t.close()
      await expect(t.encodeAsync('hi')).rejects.toThrow('The tokenizer was closed and cannot encode any more')
    }
  })

  it('leaves the event loop free while a text encodes', async () => {
    const t = await Tokenizer.load(qwenDir)
    await t.encodeAsync('warm') // the worker builds its tokenizer
    const text = 'the quick brown fox, naïve café 12 345\n'.repeat(10_000) // 400 KB: about 0.3 s of encoding here
    let ticks = 0
    const timer = setInterval(() => ticks++, 1)
    const ids = await t.encodeAsync(text)
    clearInterval(timer)
    // The same encode on this thread would let no timer run before it returned.
    expect(ticks).toBeGreaterThan(5)
    expect(ids).toEqual(t.encode(text))
    t.close()
  })

  /** A tiny tokenizer.json whose normalizer backtracks without end on a run of "a"s before another letter. */
  function backtracking(name: string): { dir: string; file: string } {
    const dir = writeTinyModel(join(root, name), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    const file = join(dir, 'tokenizer.json')
    writeFileSync(file, JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')), normalizer: BACKTRACKING_NORMALIZER }))
    return { dir, file }
  }

  it('stops a text whose pre-processing backtracks without end, and encodes the next one', async () => {
    const { dir, file } = backtracking('backtracking')
    const t = await Tokenizer.load(dir)
    const hang = 'a'.repeat(80) + 'b'
    let ticks = 0
    const timer = setInterval(() => ticks++, 5)
    const started = performance.now()
    const stuck = t.encodeAsync(hang, { timeoutMs: 500 })
    const queued = t.encodeAsync('hi there') // waits its turn, then runs in a new worker
    await expect(stuck).rejects.toThrow(
      `Encoding a text of 81 characters took longer than 0.5 s and was stopped: the text is too long for this limit, ` +
        `or a regular expression of ${file} (normalizer or pre_tokenizer) backtracks without end on it`,
    )
    await expect(stuck).rejects.toMatchObject({ name: 'EncodeTimeoutError' })
    clearInterval(timer)
    expect(performance.now() - started).toBeGreaterThanOrEqual(450)
    expect(ticks).toBeGreaterThan(20)
    expect(await queued).toEqual(t.encode('hi there'))
    t.close()
  })

  it('takes an answer posted within the time limit but read after it (this thread was busy), and nothing throws', async () => {
    const t = await Tokenizer.load(qwenDir)
    await t.encodeAsync('warm')
    const thrown: unknown[] = []
    const onUncaught = (err: unknown) => thrown.push(err)
    process.prependListener('uncaughtException', onUncaught)
    try {
      // The text is sent, then a long step holds this thread: the worker answers meanwhile, and
      // once the step ends, the next turn of the event loop runs the expired timer (timers come
      // first) before the answer is delivered. The timer finds the answer waiting and takes it.
      const { late } = await new Promise<{ late: Promise<number[]> }>((sent) =>
        setImmediate(() => {
          const late = t.encodeAsync('hi', { timeoutMs: 50 })
          const end = performance.now() + 500
          while (performance.now() < end);
          sent({ late })
        }),
      )
      expect(await late).toEqual(t.encode('hi'))
      expect(await t.encodeAsync('next')).toEqual(t.encode('next'))
      await new Promise((done) => setTimeout(done, 50))
      expect(thrown).toEqual([])
    } finally {
      process.removeListener('uncaughtException', onUncaught)
      t.close()
    }
  })

  it('drops a text whose caller stopped waiting', async () => {
    const t = await Tokenizer.load(qwenDir)
    const controller = new AbortController()
    const first = t.encodeAsync('the '.repeat(50_000), { signal: controller.signal })
    const second = t.encodeAsync('kept', { signal: new AbortController().signal })
    const third = t.encodeAsync('dropped while waiting', { signal: controller.signal })
    controller.abort(new Error('caller left'))
    await expect(first).rejects.toThrow('caller left')
    await expect(third).rejects.toThrow('caller left')
    expect(await second).toEqual(t.encode('kept'))
    await expect(t.encodeAsync('x', { signal: controller.signal })).rejects.toThrow('caller left')
    t.close()
  })

  it('abandons a long text its caller stopped waiting for, so that the next one need not wait for it', async () => {
    const t = await Tokenizer.load(backtracking('abandoned').dir)
    await t.encodeAsync('warm')
    const controller = new AbortController()
    const stuck = t.encodeAsync('a'.repeat(80) + 'b', { signal: controller.signal }) // 10 s limit
    const next = t.encodeAsync('hi there')
    await new Promise((r) => setTimeout(r, 400))
    controller.abort(new Error('client gone'))
    await expect(stuck).rejects.toThrow('client gone')
    // Answered by a new worker, long before the stuck text's limit would have freed the old one.
    let settled = false
    void next.finally(() => (settled = true))
    await new Promise((r) => setTimeout(r, 3000))
    expect(settled).toBe(true)
    expect(await next).toEqual(t.encode('hi there'))
    t.close()
  })

  it('rejects what is waiting when closed', async () => {
    const t = await Tokenizer.load(qwenDir)
    const pending = [t.encodeAsync('the '.repeat(50_000)), t.encodeAsync('next')]
    t.close()
    for (const p of pending) await expect(p).rejects.toThrow('The tokenizer was closed before the text was encoded')
  })
})

describe("chat templates render as transformers' Jinja (Python) does", () => {
  const render = (source: string, variables: Record<string, unknown> = {}) => new ChatTemplate(source, 'the test template').render(variables)

  it("strips only the characters strip(), lstrip() and rstrip() are given, as Qwen3's template asks", () => {
    const strips = "{{ x.lstrip('\\n') }}|{{ x.rstrip('\\n') }}|{{ x.strip('\\n') }}|{{ 'xxhixx'.strip('x') }}|{{ x.strip() }}"
    expect(render(strips, { x: '\n lead \n' })).toBe(' lead \n|\n lead | lead |hi|lead')
    // Qwen3's template takes an answer out of a message with its reasoning so.
    const answer = "{{ c.split('</think>')[-1].lstrip('\\n') }}"
    expect(render(answer, { c: '<think>\nr \n</think>\n\n answer' })).toBe(' answer')
  })

  it("trims Python's whitespace, or the characters given", () => {
    expect(render('{{ a | trim }}|{{ b | trim }}|{{ "xxaxx" | trim("x") }}', { a: '\ufeffa', b: '\x85a\x1c ' })).toBe('\ufeffa|a|a')
  })

  it("writes JSON as transformers' tojson (Python's json.dumps) does: floats, indent, separators, sorted keys, ASCII", () => {
    const value = parseJsonKeepingFloats('{"b": 1.0, "a": [2e3, 0.5, 1e-5, 1e16, -0.0, 3], "s": "é\\u007f", "n": null}')
    expect(render('{{ v | tojson }}', { v: value })).toBe('{"b": 1.0, "a": [2000.0, 0.5, 1e-05, 1e+16, -0.0, 3], "s": "é\x7f", "n": null}')
    expect(render('{{ v | tojson(indent=2, sort_keys=true) }}', { v: value })).toBe(
      '{\n  "a": [\n    2000.0,\n    0.5,\n    1e-05,\n    1e+16,\n    -0.0,\n    3\n  ],\n  "b": 1.0,\n  "n": null,\n  "s": "é\x7f"\n}',
    )
    expect(render('{{ v | tojson(ensure_ascii=true, separators=(",", ":")) }}', { v: value })).toBe(
      '{"b":1.0,"a":[2000.0,0.5,1e-05,1e+16,-0.0,3],"s":"\\u00e9\\u007f","n":null}',
    )
    expect(render('{{ [1, [2]] | tojson(indent=0) }}|{{ {"B": 1, "a": 2} | tojson(sort_keys=true) }}')).toBe('[\n1,\n[\n2\n]\n]|{"B": 1, "a": 2}')
    // A float prints as Python's repr() writes it.
    expect(render('{{ x }}|{{ x * 2 }}|{{ 0.00001 }}|{{ y }}', { x: new Number(3), y: 1e300 })).toBe('3.0|6.0|1e-05|1e+300')
  })

  it("prints other values as Python's str() does: None, True, False, and lists, tuples and dicts as their repr()", () => {
    const variables = { d: { a: 1, b: "x'y", c: null }, l: [1, 'a\n\\', 'é\u200b', true, new Number(2)], s: 'plain' }
    expect(render('{{ true }}|{{ false }}|{{ 1 == 1 }}|{{ d }}|{{ l }}|{{ (1, "b") }}|{{ [s] }}|{{ s }}', variables)).toBe(
      `True|False|True|{'a': 1, 'b': "x'y", 'c': None}|[1, 'a\\n\\\\', 'é\\u200b', True, 2.0]|(1, 'b')|['plain']|plain`,
    )
    // None printed writes None, also inside blocks; statements (set, macro) and undefined names write nothing.
    expect(render('{{ none }}|{{ x }}|{{ nothing }}|{% set y = none %}{{ y }}|{% if true %}{{ none }}{% endif %}|{% macro m() %}{% endmacro %}{{ m() }}', { x: null })).toBe(
      'None|None||None|None|',
    )
    // ~ and the string filter take str(): None is None there, an undefined name nothing.
    expect(render("{{ 'a' ~ none ~ true ~ 1 ~ [1] ~ nothing }}|{{ d | string }}|{{ true | string }}", variables)).toBe(
      `aNoneTrue1[1]|{'a': 1, 'b': "x'y", 'c': None}|True`,
    )
  })

  it('reads JSON with the floats that have whole values as Number objects, and nothing else changed', () => {
    const text = '{"a": 1.0, "b": 1, "c": 0.5, "d": "2.0 and \\"3.0\\"", "e": [1E2, -0.0], "f": 12345678901234567890}'
    const value = parseJsonKeepingFloats(text) as Record<string, unknown>
    expect(value['a']).toEqual(new Number(1))
    expect(value['e']).toEqual([new Number(100), new Number(-0)])
    expect(JSON.stringify(value)).toBe(JSON.stringify(JSON.parse(text)))
    expect(typeof value['b']).toBe('number')
    expect(typeof value['c']).toBe('number')
    expect(() => parseJsonKeepingFloats('{"a": 1.0,}')).toThrow(SyntaxError)
  })

  it('reads a template with Windows line ends as one with "\\n"', () => {
    const source = '<|im_start|>user\r\n  {% if true %}\r\n{{ m }}\r\n  {% endif %}\r\n'
    const template = new ChatTemplate(source, 'the test template')
    expect(template.render({ m: 'hi' })).toBe('<|im_start|>user\nhi\n')
    expect(template.source).toBe(source)
  })
})

describe('chat templates are bounded', () => {
  let count = 0
  const withTemplate = async (template: string) => {
    const dir = writeTinyModel(join(root, `tpl${count++}`), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    const cfg = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8'))
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: template }))
    return { dir, t: await Tokenizer.load(dir) }
  }
  const user = [{ role: 'user', content: 'hi' }]
  // A render in a child process of its own, so that a crash fails the case, not the test runner.
  const isolatedRender = (template: string) => {
    buildDist()
    const dir = writeTinyModel(join(root, `tpl${count++}`), { architecture: 'Qwen3ForCausalLM', numLayers: 1 }).dir
    const cfg = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8'))
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: template }))
    // Evaluated with --input-type=module, whose flag the render worker used to inherit: its
    // CommonJS source was then read as an ES module and it never started.
    const script = `import { Tokenizer } from ${JSON.stringify(join(repoRoot, 'dist', 'tokenizer.js'))}
      const t = await Tokenizer.load(${JSON.stringify(dir)})
      try { console.log(t.applyChatTemplate([{ role: 'user', content: 'hi' }])) } catch (e) { console.log(e.message) }`
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 })
    return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr }
  }

  it('refuses a range() of more than a million items at once', async () => {
    const { dir, t } = await withTemplate('{% for i in range(100000000) %}x{% endfor %}')
    const started = performance.now()
    expect(() => t.applyChatTemplate(user)).toThrow(
      `The chat template of ${dir} (chat_template in tokenizer_config.json) failed to render: range() of 100000000 items exceeds the limit of 1000000 items`,
    )
    expect(performance.now() - started).toBeLessThan(1000)
  })

  it(`stops a template that runs longer than ${RENDER_TIMEOUT_MS / 1000} s, and renders the next one`, async () => {
    const { dir, t } = await withTemplate('{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}')
    const started = performance.now()
    expect(() => t.applyChatTemplate(user)).toThrow(
      `The chat template of ${dir} (chat_template in tokenizer_config.json) did not finish rendering within ${RENDER_TIMEOUT_MS / 1000} s`,
    )
    const took = performance.now() - started
    expect(took).toBeGreaterThanOrEqual(RENDER_TIMEOUT_MS - 50)
    expect(took).toBeLessThan(RENDER_TIMEOUT_MS + 3000)
    const ok = await Tokenizer.load(qwenDir)
    expect(ok.applyChatTemplate(user)).toBe('<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
  })

  it('bounds the rendered text and the messages', async () => {
    const { t } = await withTemplate('{% for i in range(20) %}{{ messages[0].content }}{% endfor %}')
    const big = [{ role: 'user', content: 'x'.repeat(2 ** 20) }]
    expect(() => t.applyChatTemplate(big)).toThrow(`rendered ${20 * 2 ** 20} characters; at most ${MAX_RENDERED_CHARS} are allowed`)
    expect(() => t.applyChatTemplate([{ role: 'user', content: 'x'.repeat(MAX_RENDERED_CHARS + 1) }])).toThrow(
      `Expected at most ${MAX_RENDERED_CHARS} characters of messages for the chat template of`,
    )
  })

  it('renders in a process started with flags of its own (node --input-type=module -e)', () => {
    const r = isolatedRender('{{ messages[0].content }}!')
    expect([r.status, r.signal], r.stderr).toEqual([0, null])
    expect(r.stdout.trim()).toBe('hi!')
  })

  it('bounds the lists and strings a template builds, the template itself, and the errors it raises', async () => {
    // A list quadrupled forty times: one allocation past the renderer's heap used to end the process.
    const lists = isolatedRender('{% set x = [0] %}{% for i in range(40) %}{% set x = x + x + x + x %}{% endfor %}{{ x | length }}')
    expect([lists.status, lists.signal], lists.stderr).toEqual([0, null])
    expect(lists.stdout).toMatch(/failed to render: a list of \d+ items exceeds the limit of 1000000 items/)
    const { t: strings } = await withTemplate("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")
    expect(() => strings.applyChatTemplate(user)).toThrow(/failed to render: a string of \d+ characters exceeds the limit of 16777216 characters/)
    // raise_exception's text is the template's: passed on cut to 2,000 characters.
    const { t: loud } = await withTemplate("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(20) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ raise_exception(ns.s) }}")
    let message = ''
    try {
      loud.applyChatTemplate(user)
    } catch (err) {
      message = (err as Error).message
    }
    expect(message).toMatch(/failed to render: x{2000}\.\.\. \(8388608 characters\)$/)
    await expect(withTemplate('{{ a }}'.repeat(200_000))).rejects.toThrow(
      /^Expected a template of at most 1048576 characters for the chat template of .* but received 1400000 characters$/,
    )
  })

  it('names a template that does not parse, in its own words', async () => {
    await expect(withTemplate('{{')).rejects.toThrow(
      /^Could not parse the chat template of .* \(chat_template in tokenizer_config.json\): it is not a valid Jinja template \(an unterminated or malformed tag\?\)$/,
    )
    await expect(withTemplate('{% for %}')).rejects.toThrow(/^Could not parse the chat template of .*: (?!it is not a valid)/)
  })

  it('passes the template\'s own errors on, and says when it renders nothing', async () => {
    const { t } = await withTemplate("{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    expect(() => t.applyChatTemplate(user)).toThrow('failed to render: Conversation roles must alternate user/assistant')
    const { dir, t: empty } = await withTemplate('{% if false %}x{% endif %}')
    expect(() => empty.encodeChat(user)).toThrow(`The chat template of ${dir} rendered an empty prompt for 1 message(s); a prompt needs at least one token`)
    expect(() => empty.encodePrompt('hello', true)).toThrow('rendered an empty prompt')
  })

  it('costs little per render', async () => {
    const t = await Tokenizer.load(qwenDir)
    t.applyChatTemplate(user)
    const started = performance.now()
    for (let i = 0; i < 200; i++) t.applyChatTemplate(user)
    // About 0.1 ms each on 2 cores; the bound leaves room for a loaded CI machine.
    expect((performance.now() - started) / 200).toBeLessThan(5)
  })
})
