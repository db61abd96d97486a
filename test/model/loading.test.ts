// Loading weights: safetensors parsing (single, sharded, every loadable dtype), the checks on
// corrupt, truncated and mismatched files, missing files and tensors, and the progress callback.
import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { loadModel } from '../../lib/api.js'
import { native } from '../../lib/native.js'
import { Transformer } from '../../lib/model/transformer.js'
import { SafetensorsCheckpoint, SafetensorsFile, toBf16Bits } from '../../lib/model/safetensors.js'
import { loadModelConfig } from '../../lib/model/config.js'
import { loadWeights, disposeWeights, firstNonFinite } from '../../lib/model/weights.js'
import { readBytes, toBf16 } from '../../lib/tensor.js'
import { randomNormal } from '../helpers/random.js'
import { safetensorsBytes, writeTinyModel, type TinyModel, type TinyModelSpec } from '../helpers/tiny-model.js'

let root: string
let count = 0
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-loading-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

const fresh = (spec: TinyModelSpec) => writeTinyModel(join(root, `m${count++}`), spec)
const load = (dir: string) => Transformer.load(dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4 })

/** A safetensors file of the given header object and data bytes. */
function rawFile(path: string, header: unknown, data: Buffer, headerLength?: bigint): string {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header))
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(headerLength ?? BigInt(json.length))
  writeFileSync(path, Buffer.concat([len, json, data]))
  return path
}

describe('safetensors', () => {
  it('reads tensors of every loadable dtype to the same bf16 bits', async () => {
    const values = randomNormal(24, 5)
    const path = join(root, 'dtypes.safetensors')
    const f16 = new Uint16Array(24)
    // f16 encodings of the same numbers, via the native cast (round to nearest even).
    const src = native().fromBuffer('cpu', 'f32', [24], values)
    const half = native().empty('cpu', 'f16', [24])
    native().cast(half, src)
    f16.set(new Uint16Array((await readBytes(half)).buffer.slice(0)))
    writeFileSync(
      path,
      safetensorsBytes([
        { name: 'a.f32', dtype: 'F32', shape: [4, 6], data: Buffer.from(values.buffer) },
        { name: 'a.bf16', dtype: 'BF16', shape: [4, 6], data: Buffer.from(toBf16(values).buffer) },
        { name: 'a.f16', dtype: 'F16', shape: [24], data: Buffer.from(f16.buffer) },
      ]),
    )
    const file = await SafetensorsFile.open(path)
    try {
      expect([...file.tensors.keys()].sort()).toEqual(['a.bf16', 'a.f16', 'a.f32'])
      const info = file.tensors.get('a.f32')!
      expect(info).toMatchObject({ dtype: 'F32', shape: [4, 6], nbytes: 96 })
      const fromF32 = toBf16Bits(info, await file.read(info))
      expect(Buffer.from(fromF32.buffer, fromF32.byteOffset, 48).equals(Buffer.from(toBf16(values).buffer))).toBe(true)
      const bf = file.tensors.get('a.bf16')!
      expect(Array.from(toBf16Bits(bf, await file.read(bf)))).toEqual(Array.from(toBf16(values)))
      // f16 -> bf16 goes through the exact f16 value: compare with the native casts.
      const f16Info = file.tensors.get('a.f16')!
      const viaNative = native().empty('cpu', 'bf16', [24])
      native().cast(viaNative, half)
      expect(Array.from(toBf16Bits(f16Info, await file.read(f16Info)))).toEqual(
        Array.from(new Uint16Array((await readBytes(viaNative)).buffer.slice(0))),
      )
    } finally {
      await file.close()
    }
  })

  it('refuses a header longer than 100 MB, or than the file', async () => {
    const huge = rawFile(join(root, 'huge.safetensors'), {}, Buffer.alloc(0), 100_000_001n)
    await expect(SafetensorsFile.open(huge)).rejects.toThrow(
      `Invalid safetensors file ${huge}: the header length 100000001 exceeds the 100000000-byte limit`,
    )
    const long = rawFile(join(root, 'long.safetensors'), {}, Buffer.alloc(0), 4096n)
    await expect(SafetensorsFile.open(long)).rejects.toThrow(`Invalid safetensors file ${long}: the header length 4096 exceeds the file's 10 bytes (truncated?)`)
    const tiny = join(root, 'tiny.safetensors')
    writeFileSync(tiny, Buffer.alloc(5))
    await expect(SafetensorsFile.open(tiny)).rejects.toThrow(`Invalid safetensors file ${tiny}: the file is 5 bytes, too short for the 8-byte header length`)
  })

  it('rejects corrupt headers naming the file and the tensor', async () => {
    const p = join(root, 'bad.safetensors')
    const data = Buffer.alloc(16)
    rawFile(p, '{"w": ', data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow(`Invalid safetensors file ${p}: the header is not valid JSON`)
    rawFile(p, { w: { dtype: 'F33', shape: [2], data_offsets: [0, 8] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow(`Invalid safetensors file ${p}: tensor w has unknown dtype "F33"`)
    rawFile(p, { w: { dtype: 'F32', shape: [2, -1], data_offsets: [0, 8] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow('tensor w has an invalid shape [2,-1]')
    rawFile(p, { w: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow('tensor w is F32 [3] (12 bytes) but its data_offsets [0, 8] span 8 bytes')
    rawFile(p, { w: { dtype: 'F32', shape: [8], data_offsets: [0, 32] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow('tensor w has data_offsets [0, 32] beyond the 16 data bytes of the file (truncated?)')
    rawFile(p, { w: { dtype: 'F32', shape: [2], data_offsets: [8, 0] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow('tensor w has invalid data_offsets [8,0]')
    rawFile(p, { a: { dtype: 'F32', shape: [3], data_offsets: [0, 12] }, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } }, data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow(`Invalid safetensors file ${p}: tensors a and b overlap`)
    rawFile(p, [1, 2], data)
    await expect(SafetensorsFile.open(p)).rejects.toThrow('the header is not a JSON object')
  })

  it('accepts __metadata__ and zero-size tensors', async () => {
    const p = join(root, 'meta.safetensors')
    rawFile(p, { __metadata__: { format: 'pt' }, e: { dtype: 'BF16', shape: [0, 4], data_offsets: [0, 0] }, w: { dtype: 'BF16', shape: [2], data_offsets: [0, 4] } }, Buffer.alloc(4))
    const f = await SafetensorsFile.open(p)
    expect(f.metadata).toEqual({ format: 'pt' })
    expect(f.tensors.get('e')!.nbytes).toBe(0)
    await f.close()
  })

  it('refuses dtypes it cannot load when the tensor is read', async () => {
    const p = rawFile(join(root, 'i64.safetensors'), { ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] } }, Buffer.alloc(16))
    const f = await SafetensorsFile.open(p)
    const info = f.tensors.get('ids')!
    expect(() => toBf16Bits(info, Buffer.alloc(16))).toThrow(`tensor ids in ${p} has dtype I64; supported dtypes: BF16, F16, F32`)
    await f.close()
  })
})

describe('model weights', () => {
  it('load identically from bf16, f16, f32 and sharded files', async () => {
    const spec: TinyModelSpec = { architecture: 'Qwen2ForCausalLM', seed: 9 }
    const dirs = [fresh(spec), fresh({ ...spec, dtype: 'F16' }), fresh({ ...spec, dtype: 'F32', shards: 4 })].map((m) => m.dir)
    const bytes: Buffer[][] = []
    for (const dir of dirs) {
      const config = await loadModelConfig(dir)
      const w = await loadWeights(dir, config, 'cpu')
      bytes.push(await Promise.all([w.embedTokens, w.layers[1]!.qkvBias!, w.layers[0]!.downProj, w.lmHead].map((t) => readBytes(t))))
      disposeWeights(w)
    }
    for (let i = 0; i < 4; i++) {
      expect(bytes[1]![i]!.equals(bytes[0]![i]!)).toBe(true)
      expect(bytes[2]![i]!.equals(bytes[0]![i]!)).toBe(true)
    }
  })

  it('hold q|k|v and gate|up as one tensor each, the checkpoint rows in that order', async () => {
    const m = fresh({ architecture: 'Qwen2ForCausalLM', shards: 3, seed: 4 })
    const w = await loadWeights(m.dir, await loadModelConfig(m.dir), 'cpu')
    try {
      const rows = (names: string[]) => {
        const parts = names.map((name) => m.tensors.get(name)!)
        const values = new Float32Array(parts.reduce((s, p) => s + p.values.length, 0))
        parts.reduce((at, p) => (values.set(p.values, at), at + p.values.length), 0)
        return Buffer.from(toBf16(values).buffer)
      }
      for (const l of [0, 1]) {
        const a = `model.layers.${l}.self_attn.`
        const mlp = `model.layers.${l}.mlp.`
        const layer = w.layers[l]!
        expect((await readBytes(layer.qkvProj)).equals(rows(['q_proj', 'k_proj', 'v_proj'].map((p) => `${a}${p}.weight`)))).toBe(true)
        expect((await readBytes(layer.qkvBias!)).equals(rows(['q_proj', 'k_proj', 'v_proj'].map((p) => `${a}${p}.bias`)))).toBe(true)
        expect((await readBytes(layer.gateUpProj)).equals(rows([`${mlp}gate_proj.weight`, `${mlp}up_proj.weight`]))).toBe(true)
        expect(layer.gateUpBias).toBeNull()
      }
    } finally {
      disposeWeights(w)
    }
  })

  it('report progress in bytes up to the total', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM', shards: 2 })
    const seen: { loadedBytes: number; totalBytes: number }[] = []
    const model = await Transformer.load(m.dir, { device: 'cpu', maxBatchTokens: 4, kvBlocks: 2, onProgress: (p) => seen.push(p) })
    model.dispose()
    const total = [...m.tensors.values()].reduce((s, t) => s + t.values.length * 2, 0)
    expect(seen[0]).toEqual({ loadedBytes: 0, totalBytes: total })
    expect(seen.at(-1)).toEqual({ loadedBytes: total, totalBytes: total })
    for (let i = 1; i < seen.length; i++) expect(seen[i]!.loadedBytes).toBeGreaterThan(seen[i - 1]!.loadedBytes)
  })

  it('name a tensor whose shape disagrees with the config', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM' })
    const cfg = JSON.parse(readFileSync(join(m.dir, 'config.json'), 'utf8'))
    writeFileSync(join(m.dir, 'config.json'), JSON.stringify({ ...cfg, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 16 }))
    await expect(load(m.dir)).rejects.toThrow(
      'tensor model.layers.0.self_attn.q_proj.weight in model.safetensors has shape [64, 64] but the config implies [128, 64]',
    )
    writeFileSync(join(m.dir, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: 100 }))
    await expect(load(m.dir)).rejects.toThrow(
      'tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [96, 64] but the config implies [100, 64]',
    )
  })

  it('name a missing tensor', async () => {
    const m = fresh({ architecture: 'Qwen3ForCausalLM' })
    const entries = [...m.tensors]
      .filter(([name]) => name !== 'model.layers.1.self_attn.k_norm.weight')
      .map(([name, t]) => ({ name, dtype: 'F32', shape: t.shape, data: Buffer.from(t.values.buffer) }))
    writeFileSync(join(m.dir, 'model.safetensors'), safetensorsBytes(entries))
    await expect(load(m.dir)).rejects.toThrow(
      `tensor model.layers.1.self_attn.k_norm.weight is missing from the weights in ${m.dir} (the Qwen3ForCausalLM configuration needs it)`,
    )
    // An untied model without lm_head.weight.
    const untied = fresh({ architecture: 'MistralForCausalLM' })
    const noHead = [...untied.tensors]
      .filter(([name]) => name !== 'lm_head.weight')
      .map(([name, t]) => ({ name, dtype: 'F32', shape: t.shape, data: Buffer.from(t.values.buffer) }))
    writeFileSync(join(untied.dir, 'model.safetensors'), safetensorsBytes(noHead))
    await expect(load(untied.dir)).rejects.toThrow('tensor lm_head.weight is missing from the weights')
  })

  it('fail clearly on a truncated weights file', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM' })
    const file = join(m.dir, 'model.safetensors')
    truncateSync(file, readFileSync(file).length - 10)
    await expect(load(m.dir)).rejects.toThrow(`Invalid safetensors file ${file}: tensor lm_head.weight has data_offsets`)
    await expect(load(m.dir)).rejects.toThrow('(truncated?)')
  })

  it('check the shard index against the shards', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM', shards: 2 })
    const indexFile = join(m.dir, 'model.safetensors.index.json')
    const original = readFileSync(indexFile, 'utf8')
    const index = JSON.parse(original)
    index.weight_map['model.norm.weight'] = 'model-00001-of-00002.safetensors'
    writeFileSync(indexFile, JSON.stringify(index))
    await expect(load(m.dir)).rejects.toThrow(
      `${indexFile} maps tensor model.norm.weight to model-00001-of-00002.safetensors, but ${join(m.dir, 'model-00001-of-00002.safetensors')} does not contain it`,
    )
    writeFileSync(indexFile, original)
    unlinkSync(join(m.dir, 'model-00002-of-00002.safetensors'))
    await expect(load(m.dir)).rejects.toThrow(
      `model-00002-of-00002.safetensors not found: ${join(m.dir, 'model-00002-of-00002.safetensors')} does not exist`,
    )
    writeFileSync(indexFile, JSON.stringify({ weight_map: ['x'] }))
    await expect(load(m.dir)).rejects.toThrow(`Expected an object for weight_map in ${indexFile} but received ["x"]`)
    // A shard is a NAME.safetensors file of the directory: no path, no "." or "..".
    for (const bad of ['..', '.', '', '../x.safetensors', 'sub/x.safetensors', 'model.bin', '.safetensors']) {
      writeFileSync(indexFile, JSON.stringify({ weight_map: { 'model.norm.weight': bad } }))
      await expect(load(m.dir)).rejects.toThrow(
        `Expected a shard file name (NAME.safetensors in the same directory) for weight_map["model.norm.weight"] in ${indexFile} but received ${JSON.stringify(bad)}`,
      )
    }
  })

  it('check every tensor of every shard, those the index leaves out too, and refuse one held twice', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM', shards: 2, tieWordEmbeddings: true })
    const first = join(m.dir, 'model-00001-of-00002.safetensors')
    const second = join(m.dir, 'model-00002-of-00002.safetensors')
    const entriesOf = async (file: string) => {
      const f = await SafetensorsFile.open(file)
      const list = await Promise.all([...f.tensors.values()].map(async (t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, data: await f.read(t) })))
      await f.close()
      return list
    }
    const firstEntries = await entriesOf(first)
    const secondEntries = await entriesOf(second)
    // A stray lm_head in a shard, not in the index, with tied embeddings: unused, as in one file.
    const head = secondEntries.find((e) => e.name === 'model.embed_tokens.weight') ?? firstEntries.find((e) => e.name === 'model.embed_tokens.weight')!
    writeFileSync(second, safetensorsBytes([...secondEntries, { ...head, name: 'lm_head.weight' }]))
    await expect(load(m.dir)).rejects.toThrow('tensor lm_head.weight in model-00002-of-00002.safetensors is not used by the LlamaForCausalLM configuration')
    // A tensor the index maps to one shard, also in the other.
    writeFileSync(second, safetensorsBytes(secondEntries))
    const moved = secondEntries[0]!
    writeFileSync(first, safetensorsBytes([...firstEntries, moved]))
    await expect(load(m.dir)).rejects.toThrow(
      `${first} holds tensor ${moved.name}, which ${join(m.dir, 'model.safetensors.index.json')} maps to model-00002-of-00002.safetensors: a tensor must be in one shard`,
    )
  })

  it('name missing files', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM' })
    unlinkSync(join(m.dir, 'model.safetensors'))
    await expect(load(m.dir)).rejects.toThrow(`No weights found in ${m.dir}: expected model.safetensors or model.safetensors.index.json`)
    unlinkSync(join(m.dir, 'config.json'))
    await expect(load(m.dir)).rejects.toThrow(`config.json not found: ${join(m.dir, 'config.json')} does not exist`)
    await expect(load(join(root, 'nowhere'))).rejects.toThrow('config.json not found')
    const bad = fresh({ architecture: 'LlamaForCausalLM' })
    writeFileSync(join(bad.dir, 'config.json'), '{"architectures": [')
    await expect(load(bad.dir)).rejects.toThrow(`${join(bad.dir, 'config.json')} is not valid JSON`)
  })

  it('refuse an unsupported architecture by name', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM', configOverrides: { architectures: ['PhiForCausalLM'] } })
    await expect(load(m.dir)).rejects.toThrow(
      'Architecture PhiForCausalLM (in ' + join(m.dir, 'config.json') + ') is not supported; supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM',
    )
  })
})

describe('Transformer arguments', () => {
  let model: Transformer
  beforeAll(async () => {
    model = await Transformer.load(fresh({ architecture: 'LlamaForCausalLM', maxPositions: 40 }).dir, {
      device: 'cpu',
      maxBatchTokens: 16,
      kvBlocks: 4,
      kvBlockSize: 16,
      maxLogitRows: 4,
    })
  })
  afterAll(() => model.dispose())

  it('exposes its sizes', () => {
    expect([model.device, model.maxBatchTokens, model.kvBlocks, model.kvBlockSize, model.maxLogitRows, model.maxPositions]).toEqual([
      'cpu', 16, 4, 16, 4, 40,
    ])
    expect(model.config.architecture).toBe('LlamaForCausalLM')
  })

  it('validates load options', async () => {
    const dir = fresh({ architecture: 'LlamaForCausalLM' }).dir
    await expect(Transformer.load(dir, { device: 'tpu' as never, maxBatchTokens: 4, kvBlocks: 2 })).rejects.toThrow(
      `Expected 'cpu' or 'cuda' for device but received "tpu" of type string`,
    )
    await expect(Transformer.load(dir, { device: 'cpu', maxBatchTokens: 0, kvBlocks: 2 })).rejects.toThrow(
      'Expected integer >= 1 for maxBatchTokens but received 0 of type number',
    )
    await expect(Transformer.load(dir, { device: 'cpu', maxBatchTokens: 4, kvBlocks: 2.5 })).rejects.toThrow(
      'Expected integer >= 1 for kvBlocks but received 2.5 of type number',
    )
  })

  it('validates chunks before enqueuing anything', () => {
    const V = model.config.vocabSize
    const ok = { tokens: [1, 2], startPosition: 0, blockTable: [0], logits: 'last' as const }
    expect(() => model.forward([])).toThrow('Expected a non-empty array of sequence chunks for chunks but received [] of type array')
    expect(() => model.forward([{ ...ok, tokens: [] }])).toThrow('Expected a non-empty array of token ids for chunks[0].tokens but received [] of type array')
    expect(() => model.forward([ok, { ...ok, tokens: [1, V] }])).toThrow(
      `Expected an integer between 0 and ${V - 1} for chunks[1].tokens[1] but received ${V} of type number`,
    )
    expect(() => model.forward([{ ...ok, startPosition: -1 }])).toThrow('Expected integer >= 0 for chunks[0].startPosition but received -1 of type number')
    expect(() => model.forward([{ ...ok, startPosition: 39, blockTable: [0, 1, 2] }])).toThrow(
      'Expected positions below 40 (max_position_embeddings) for chunks[0] but received positions 39..40',
    )
    expect(() => model.forward([{ ...ok, startPosition: 15 }])).toThrow(
      'Expected at least 2 block ids for chunks[0].blockTable (positions 0..16, 16 per block) but received [0] of type array',
    )
    expect(() => model.forward([{ ...ok, blockTable: [4] }])).toThrow('Expected an integer between 0 and 3 for chunks[0].blockTable[0] but received 4 of type number')
    expect(() => model.forward([{ ...ok, logits: 'first' as never }])).toThrow(
      `Expected 'none', 'last' or 'all' for chunks[0].logits but received "first" of type string`,
    )
    expect(() => model.forward([{ ...ok, tokens: new Array(17).fill(1), blockTable: [0, 1] }])).toThrow(
      'Expected at most 16 tokens (maxBatchTokens) for chunks but received 17',
    )
    expect(() => model.forward([{ ...ok, tokens: [1, 2, 3, 4, 5], logits: 'all' }])).toThrow(
      'Expected at most 4 logit rows (maxLogitRows) for chunks but received 5',
    )
  })

  it('caps positions at the KV cache capacity and refuses use after dispose', async () => {
    const small = await Transformer.load(fresh({ architecture: 'Qwen3ForCausalLM' }).dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 2, kvBlockSize: 4 })
    expect(small.maxPositions).toBe(8)
    expect(() => small.forward([{ tokens: [1], startPosition: 8, blockTable: [0, 1, 0], logits: 'last' }])).toThrow(
      'Expected positions below 8 (KV cache capacity) for chunks[0] but received positions 8..8',
    )
    small.dispose()
    expect(() => small.forward([{ tokens: [1], startPosition: 0, blockTable: [0], logits: 'last' }])).toThrow('The transformer was disposed and cannot be used any more')
  })
})

describe('checkpoints that do not match their config', () => {
  const setConfig = (dir: string, over: Record<string, unknown>) => {
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'))
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, ...over }))
  }
  const rewrite = (m: TinyModel, edit: (name: string, t: { shape: number[]; values: Float32Array }) => Float32Array | null) => {
    const entries = [...m.tensors].flatMap(([name, t]) => {
      const values = edit(name, t)
      return values ? [{ name, dtype: 'F32', shape: t.shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) }] : []
    })
    writeFileSync(join(m.dir, 'model.safetensors'), safetensorsBytes(entries))
  }

  it('fail fast on a huge num_hidden_layers, naming config.json and the field', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM' })
    for (const layers of [1e9, 1e7, 1e308, 2 ** 31]) {
      setConfig(m.dir, { num_hidden_layers: layers })
      const started = performance.now()
      await expect(load(m.dir)).rejects.toThrow(
        `Expected an integer between 1 and 1024 for num_hidden_layers in ${join(m.dir, 'config.json')} but received ${String(layers)} of type number`,
      )
      expect(performance.now() - started).toBeLessThan(1000)
    }
  })

  it('refuse a num_hidden_layers that differs from the layers of the weights', async () => {
    const m = fresh({ architecture: 'Qwen3ForCausalLM', numLayers: 4 })
    setConfig(m.dir, { num_hidden_layers: 3 })
    await expect(load(m.dir)).rejects.toThrow(
      `Expected the number of layers of the weights in ${m.dir} (4: model.layers.0 to model.layers.3) for num_hidden_layers in ${join(m.dir, 'config.json')} but received 3 of type number`,
    )
    setConfig(m.dir, { num_hidden_layers: 5 })
    await expect(load(m.dir)).rejects.toThrow('(4: model.layers.0 to model.layers.3) for num_hidden_layers')
  })

  it('refuse tensors the config leaves unused', async () => {
    // Qwen3 weights (with q_norm/k_norm) under a Llama config.
    const qwen3 = fresh({ architecture: 'Qwen3ForCausalLM' })
    setConfig(qwen3.dir, { architectures: ['LlamaForCausalLM'], model_type: 'llama' })
    await expect(load(qwen3.dir)).rejects.toThrow(
      `tensor model.layers.0.self_attn.q_norm.weight in model.safetensors is not used by the LlamaForCausalLM configuration of ${join(qwen3.dir, 'config.json')}; ` +
        'per-head q/k norms belong to Qwen3ForCausalLM, but architectures names LlamaForCausalLM; the weights must match their config.json',
    )
    // Qwen2 weights (q/k/v biases) under a Llama config.
    const qwen2 = fresh({ architecture: 'Qwen2ForCausalLM' })
    setConfig(qwen2.dir, { architectures: ['LlamaForCausalLM'] })
    await expect(load(qwen2.dir)).rejects.toThrow('tensor model.layers.0.self_attn.q_proj.bias in model.safetensors is not used')
    // An untied checkpoint whose config says tied: its lm_head would be ignored.
    const untied = fresh({ architecture: 'LlamaForCausalLM' })
    setConfig(untied.dir, { tie_word_embeddings: true })
    await expect(load(untied.dir)).rejects.toThrow(
      'tensor lm_head.weight in model.safetensors is not used by the LlamaForCausalLM configuration of ' +
        `${join(untied.dir, 'config.json')}; tie_word_embeddings is true, so the output head would be model.embed_tokens.weight`,
    )
    // A stray tensor, in one shard of several.
    const sharded = fresh({ architecture: 'LlamaForCausalLM', shards: 2 })
    const indexFile = join(sharded.dir, 'model.safetensors.index.json')
    const index = JSON.parse(readFileSync(indexFile, 'utf8'))
    const shard = join(sharded.dir, 'model-00002-of-00002.safetensors')
    const f = await SafetensorsFile.open(shard)
    const kept = await Promise.all([...f.tensors.values()].map(async (t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, data: await f.read(t) })))
    await f.close()
    writeFileSync(shard, safetensorsBytes([...kept, { name: 'model.extra.weight', dtype: 'F32', shape: [2], data: Buffer.alloc(8) }]))
    index.weight_map['model.extra.weight'] = 'model-00002-of-00002.safetensors'
    writeFileSync(indexFile, JSON.stringify(index))
    await expect(load(sharded.dir)).rejects.toThrow('tensor model.extra.weight in model-00002-of-00002.safetensors is not used by the LlamaForCausalLM configuration')
    // Old exports' rotary inverse frequencies are buffers, not weights: they are let through.
    const rotary = fresh({ architecture: 'LlamaForCausalLM' })
    const entries = [...rotary.tensors].map(([name, t]) => ({ name, dtype: 'F32', shape: t.shape, data: Buffer.from(t.values.buffer) }))
    entries.push({ name: 'model.layers.0.self_attn.rotary_emb.inv_freq', dtype: 'F32', shape: [8], data: Buffer.alloc(32) })
    writeFileSync(join(rotary.dir, 'model.safetensors'), safetensorsBytes(entries))
    ;(await load(rotary.dir)).dispose()
  })

  it('refuse non-finite weights, naming the tensor and the element', async () => {
    const m = fresh({ architecture: 'Qwen3ForCausalLM' })
    rewrite(m, (name, t) => (name === 'model.norm.weight' ? new Float32Array(t.values.length).fill(NaN) : t.values))
    await expect(load(m.dir)).rejects.toThrow(
      'tensor model.norm.weight in model.safetensors holds NaN at [0] (after conversion from F32 to bf16); a model with non-finite weights gives non-finite logits',
    )
    rewrite(m, (name, t) => {
      if (name !== 'model.layers.1.mlp.down_proj.weight') return t.values
      const v = t.values.slice()
      v[2 * t.shape[1]! + 5] = -Infinity
      return v
    })
    await expect(load(m.dir)).rejects.toThrow('tensor model.layers.1.mlp.down_proj.weight in model.safetensors holds -Infinity at [2, 5]')
    // bf16 files are scanned as they are.
    const bf = fresh({ architecture: 'LlamaForCausalLM' })
    const entries = [...bf.tensors].map(([name, t]) => {
      const bits = toBf16(t.values)
      if (name === 'model.layers.0.input_layernorm.weight') bits[bits.length - 1] = 0x7f80
      return { name, dtype: 'BF16', shape: t.shape, data: Buffer.from(bits.buffer) }
    })
    writeFileSync(join(bf.dir, 'model.safetensors'), safetensorsBytes(entries))
    await expect(load(bf.dir)).rejects.toThrow('tensor model.layers.0.input_layernorm.weight in model.safetensors holds Infinity at [63];')
  })

  it('find the first non-finite bf16 value at any length and alignment', () => {
    const one = 0x3f80
    for (const length of [1, 2, 3, 7, 8, 9]) {
      for (const bad of [0x7f80, 0xff80, 0x7fc0, 0x7f81]) {
        const bits = new Uint16Array(length + 1).fill(one)
        expect(firstNonFinite(bits.subarray(0, length))).toBe(-1)
        expect(firstNonFinite(bits.subarray(1, length + 1))).toBe(-1)
        bits[length] = bad
        expect(firstNonFinite(bits)).toBe(length)
        expect(firstNonFinite(bits.subarray(1))).toBe(length - 1)
      }
    }
    // The largest finite bf16 values are not flagged.
    expect(firstNonFinite(new Uint16Array([0x7f7f, 0xff7f, 0x0000, 0x8000, 0x0001]))).toBe(-1)
  })

  it('open only regular files: a directory or a FIFO is named, not a hang or a bare EISDIR', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM' })
    const weights = join(m.dir, 'model.safetensors')
    rmSync(weights)
    mkdirSync(weights)
    await expect(load(m.dir)).rejects.toThrow(`Expected a regular file for model.safetensors but ${weights} is a directory`)
    rmSync(weights, { recursive: true })
    if (spawnSync('mkfifo', [weights]).status === 0) {
      const started = performance.now()
      await expect(load(m.dir)).rejects.toThrow(`Expected a regular file for model.safetensors but ${weights} is a FIFO (named pipe)`)
      expect(performance.now() - started).toBeLessThan(2000)
    }
    const other = fresh({ architecture: 'LlamaForCausalLM' })
    rmSync(join(other.dir, 'config.json'))
    mkdirSync(join(other.dir, 'config.json'))
    await expect(load(other.dir)).rejects.toThrow(`Expected a regular file for config.json but ${join(other.dir, 'config.json')} is a directory`)
  })
})

describe('loadModel', () => {
  it('refuses a tokenizer whose ids pass the vocab_size of config.json', async () => {
    const m = fresh({ architecture: 'Qwen3ForCausalLM', numLayers: 1 })
    const tokenizer = join(m.dir, 'tokenizer.json')
    const json = JSON.parse(readFileSync(tokenizer, 'utf8'))
    json.added_tokens.push({ id: 300, content: '<extra>', special: true, normalized: false, single_word: false, lstrip: false, rstrip: false })
    writeFileSync(tokenizer, JSON.stringify(json))
    await expect(loadModel(m.dir, { device: 'cpu' })).rejects.toThrow(
      `Expected a token id below 273 (vocab_size in ${join(m.dir, 'config.json')}) for added_tokens[5].id in ${tokenizer} but received 300 of type number`,
    )
  })

  it('refuses an eos_token_id outside the vocabulary, in config.json or generation_config.json', async () => {
    const m = fresh({ architecture: 'LlamaForCausalLM', numLayers: 1, configOverrides: { eos_token_id: 1e9 } })
    await expect(loadModel(m.dir, { device: 'cpu' })).rejects.toThrow(
      `Expected a token id below 273 (the vocab_size) or an array of them for eos_token_id in ${join(m.dir, 'config.json')} but received 1000000000 of type number`,
    )
    const g = fresh({ architecture: 'LlamaForCausalLM', numLayers: 1 })
    writeFileSync(join(g.dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [1, 1e9] }))
    await expect(loadModel(g.dir, { device: 'cpu' })).rejects.toThrow(`for eos_token_id in ${join(g.dir, 'generation_config.json')} but received [1,1000000000] of type array`)
  })
})
