// The command line's value parsers, without a process: what they take and what they refuse.
import { InvalidArgumentError } from 'commander'
import { describe, expect, it } from 'vitest'
import { ids } from '../../lib/cli/parse.js'

describe('--completion-ids', () => {
  it('takes ids separated by commas, or a JSON array of them', () => {
    expect(ids('12,7,3')).toEqual([12, 7, 3])
    expect(ids(' [12, 7, 3] ')).toEqual([12, 7, 3])
    expect(ids('0')).toEqual([0])
  })

  it.each(['1,,2', '1,2,', ',1', '[]', '', ' ', '0x10', '1e2', '-1', '1.5', '9007199254740993'])('refuses %j instead of reading token 0 or another id', (value) => {
    expect(() => ids(value)).toThrow(InvalidArgumentError)
    expect(() => ids(value)).toThrow(`expected token ids separated by commas (or a JSON array of them) but received "${value}"`)
  })
})

describe('generate --json-object', () => {
  it('says what it holds the completion to: a JSON object (JSON mode), not any JSON', async () => {
    const { generateCommand } = await import('../../lib/cli/generate.js')
    const option = generateCommand().options.find((o) => o.long === '--json-object')!
    expect(option.description).toContain('a JSON object')
  })
})
