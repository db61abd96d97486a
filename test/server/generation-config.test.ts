// The sampling defaults of generation_config.json as `detinfer serve --generation-config` reads
// them (lib/server/generation-config.ts): what counts as set, what is refused, what is reported.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { describeSamplingDefaults, readGenerationDefaults } from '../../lib/server/generation-config.js'

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-generation-config-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

/** A directory whose generation_config.json holds `config` (a string as it is). */
function dirWith(config: unknown): string {
  const d = mkdtempSync(join(root, 'd'))
  writeFileSync(join(d, 'generation_config.json'), typeof config === 'string' ? config : JSON.stringify(config))
  return d
}

describe('readGenerationDefaults', () => {
  it("Qwen3's file: temperature, top_p and top_k; do_sample and the token ids are not read", async () => {
    const dir = dirWith({ bos_token_id: 151643, do_sample: true, eos_token_id: [151645, 151643], pad_token_id: 151643, temperature: 0.6, top_k: 20, top_p: 0.95 })
    const d = await readGenerationDefaults(dir)
    expect(d).toEqual({ sampling: { temperature: 0.6, topP: 0.95, topK: 20 }, file: join(dir, 'generation_config.json') })
    expect(describeSamplingDefaults(d.sampling)).toBe('temperature 0.6, top_p 0.95, top_k 20')
  })

  it("values equal to transformers' defaults are not settings; min_p, max_new_tokens and 0 for none", async () => {
    const d = await readGenerationDefaults(dirWith({ temperature: 1.0, top_p: 1, top_k: 50, repetition_penalty: 1.0, min_p: 0.1, max_new_tokens: 512 }))
    expect(d.sampling).toEqual({ minP: 0.1, maxTokens: 512 })
    expect(describeSamplingDefaults(d.sampling)).toBe('min_p 0.1, max_tokens 512')
    expect((await readGenerationDefaults(dirWith({ top_k: 0, min_p: 0, temperature: null }))).sampling).toEqual({})
    // -1 is no limit, as a request's top_k -1 is (vLLM's disabled value)
    expect((await readGenerationDefaults(dirWith({ top_k: -1, temperature: 0.7 }))).sampling).toEqual({ temperature: 0.7 })
  })

  it("Qwen2.5's file: a repetition penalty too", async () => {
    const d = await readGenerationDefaults(dirWith({ do_sample: true, repetition_penalty: 1.05, temperature: 0.7, top_p: 0.8, top_k: 20 }))
    expect(d.sampling).toEqual({ temperature: 0.7, topP: 0.8, topK: 20, repetitionPenalty: 1.05 })
    expect(describeSamplingDefaults(d.sampling)).toBe('temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05')
  })

  it('no file: no defaults, unless one is required', async () => {
    const empty = mkdtempSync(join(root, 'empty'))
    expect(await readGenerationDefaults(empty)).toEqual({ sampling: {}, file: null })
    await expect(readGenerationDefaults(empty, { required: true })).rejects.toThrow(`generation_config.json not found: ${join(empty, 'generation_config.json')} does not exist`)
  })

  it('refuses what a request could not set, naming the file, the key and the way out', async () => {
    const cases: [unknown, string][] = [
      [{ temperature: 2.5 }, 'Expected a number between 0 and 2 for temperature'],
      [{ temperature: '0.7' }, 'Expected a number for temperature'],
      [{ top_p: 0 }, 'Expected a number above 0 and at most 1 for top_p'],
      [{ top_k: 2.5 }, 'Expected an integer of at least -1 (-1 or 0: no limit) for top_k'],
      [{ top_k: -2 }, 'Expected an integer of at least -1 (-1 or 0: no limit) for top_k'],
      [{ min_p: 1.5 }, 'Expected a number between 0 and 1 for min_p'],
      [{ max_new_tokens: 0 }, 'Expected an integer of at least 1 for max_new_tokens'],
      [{ repetition_penalty: 'high' }, 'Expected a number for repetition_penalty'],
      [{ repetition_penalty: 0 }, 'Expected a number above 0 and at most 2 for repetition_penalty'],
    ]
    for (const [config, message] of cases) {
      const dir = dirWith(config)
      await expect(readGenerationDefaults(dir)).rejects.toThrow(`${message} in ${join(dir, 'generation_config.json')} but received`)
      await expect(readGenerationDefaults(dir)).rejects.toThrow('`--generation-config none` serves without')
    }
    const broken = dirWith('{"temperature": 0.6,')
    await expect(readGenerationDefaults(broken)).rejects.toThrow(`Could not read the sampling defaults of ${join(broken, 'generation_config.json')}:`)
    await expect(readGenerationDefaults(dirWith('[1]'))).rejects.toThrow('Expected a JSON object in')
  })
})
