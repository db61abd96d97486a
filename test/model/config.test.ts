// config.json parsing: the four architectures, their defaults and flags, and the error messages.
import { describe, expect, it } from 'vitest'
import { parseModelConfig } from '../../lib/model/config.js'

const base = {
  architectures: ['LlamaForCausalLM'],
  hidden_size: 64,
  intermediate_size: 96,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  max_position_embeddings: 512,
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  vocab_size: 300,
  torch_dtype: 'bfloat16',
}
const parse = (over: Record<string, unknown>) => parseModelConfig({ ...base, ...over }, 'm/config.json')

describe('model config', () => {
  it('reads a Llama config with its defaults', () => {
    const c = parse({ bos_token_id: 1, eos_token_id: [2, 3] })
    expect(c).toMatchObject({
      architecture: 'LlamaForCausalLM',
      hiddenSize: 64,
      intermediateSize: 96,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      vocabSize: 300,
      maxPositionEmbeddings: 512,
      rmsNormEps: 1e-5,
      ropeTheta: 500000,
      ropeScaling: null,
      tieWordEmbeddings: false,
      qkvBias: false,
      outputBias: false,
      mlpBias: false,
      qkNorm: false,
      dtype: 'bfloat16',
      bosTokenId: 1,
      eosTokenIds: [2, 3],
    })
    const noKv = parse({ num_key_value_heads: undefined, rms_norm_eps: undefined, rope_theta: undefined })
    expect([noKv.numKvHeads, noKv.rmsNormEps, noKv.ropeTheta]).toEqual([4, 1e-6, 10000])
  })

  it('sets the flags of each architecture', () => {
    const qwen2 = parse({ architectures: ['Qwen2ForCausalLM'], use_sliding_window: false, sliding_window: 32 })
    expect([qwen2.qkvBias, qwen2.outputBias, qwen2.qkNorm]).toEqual([true, false, false])
    const qwen3 = parse({ architectures: ['Qwen3ForCausalLM'], head_dim: 32, tie_word_embeddings: true })
    expect([qwen3.qkvBias, qwen3.qkNorm, qwen3.headDim, qwen3.tieWordEmbeddings]).toEqual([false, true, 32, true])
    const llamaBias = parse({ attention_bias: true, mlp_bias: true })
    expect([llamaBias.qkvBias, llamaBias.outputBias, llamaBias.mlpBias]).toEqual([true, true, true])
    const mistral = parse({ architectures: ['MistralForCausalLM'], sliding_window: null })
    expect(mistral.architecture).toBe('MistralForCausalLM')
    expect(parse({ architectures: ['MistralForCausalLM'], sliding_window: 512 }).architecture).toBe('MistralForCausalLM')
  })

  it('reads rope_theta and llama3 scaling from rope_scaling or rope_parameters', () => {
    const scaling = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 }
    const expected = { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 }
    expect(parse({ rope_scaling: scaling }).ropeScaling).toEqual(expected)
    expect(parse({ rope_scaling: { ...scaling, rope_type: undefined, type: 'llama3' } }).ropeScaling).toEqual(expected)
    const v5 = parse({ rope_theta: undefined, rope_parameters: { ...scaling, rope_theta: 1e6 } })
    expect([v5.ropeTheta, v5.ropeScaling]).toEqual([1e6, expected])
    expect(parse({ rope_scaling: { rope_type: 'default' } }).ropeScaling).toBeNull()
    expect(parse({ rope_theta: undefined, rope_parameters: { rope_type: 'default', rope_theta: 5e5 } }).ropeTheta).toBe(5e5)
  })

  it('names the supported architectures when given another', () => {
    expect(() => parse({ architectures: ['GPT2LMHeadModel'] })).toThrow(
      'Architecture GPT2LMHeadModel (in m/config.json) is not supported; supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM',
    )
    expect(() => parse({ architectures: undefined })).toThrow(
      'Expected an array naming one of LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM for architectures in m/config.json but received undefined',
    )
  })

  it('rejects sliding-window attention that would bite', () => {
    expect(() => parse({ architectures: ['MistralForCausalLM'], sliding_window: 128 })).toThrow(
      'Sliding-window attention (sliding_window 128 < max_position_embeddings 512 in m/config.json) is not supported',
    )
    // HF's MistralConfig defaults sliding_window to 4096.
    expect(() => parse({ architectures: ['MistralForCausalLM'], max_position_embeddings: 32768 })).toThrow(
      'sliding_window 4096 < max_position_embeddings 32768',
    )
    expect(() => parse({ architectures: ['Qwen2ForCausalLM'], use_sliding_window: true, sliding_window: 64 })).toThrow(
      'Sliding-window attention (sliding_window 64 < max_position_embeddings 512',
    )
  })

  it('validates types and ranges with one message format', () => {
    expect(() => parse({ hidden_size: '64' })).toThrow(
      'Expected an integer between 1 and 65536 for hidden_size in m/config.json but received "64" of type string',
    )
    expect(() => parse({ num_hidden_layers: 0 })).toThrow(
      'Expected an integer between 1 and 1024 for num_hidden_layers in m/config.json but received 0 of type number',
    )
    expect(() => parse({ num_key_value_heads: 3 })).toThrow(
      'Expected a divisor of num_attention_heads (4) for num_key_value_heads in m/config.json but received 3 of type number',
    )
    expect(() => parse({ rms_norm_eps: -1 })).toThrow('Expected a number above 0 and at most 1 for rms_norm_eps in m/config.json but received -1 of type number')
    expect(() => parse({ tie_word_embeddings: 'yes' })).toThrow(
      'Expected a boolean for tie_word_embeddings in m/config.json but received "yes" of type string',
    )
    expect(() => parse({ head_dim: 15 })).toThrow('Expected an even integer between 2 and 1024 for head_dim in m/config.json but received 15 of type number')
    expect(() => parse({ hidden_act: 'gelu' })).toThrow('Expected "silu" for hidden_act in m/config.json but received "gelu" of type string')
    expect(() => parse({ torch_dtype: 'int8' })).toThrow(
      'Expected "bfloat16", "float16" or "float32" for torch_dtype in m/config.json but received "int8" of type string',
    )
    expect(() => parse({ rope_scaling: { rope_type: 'yarn', factor: 4 } })).toThrow(
      'RoPE scaling type "yarn" (rope_scaling in m/config.json) is not supported; supported: "default", "llama3"',
    )
    expect(() => parse({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4 } })).toThrow(
      'Expected an integer between 1 and 16777216 for rope_scaling.original_max_position_embeddings in m/config.json but received undefined',
    )
    expect(() => parseModelConfig([], 'x.json')).toThrow('Expected a JSON object for the configuration in x.json but received [] of type array')
  })
  it('bounds every size before anything is sized from it', () => {
    for (const layers of [1e9, 1e7, 1e308, 2 ** 31])
      expect(() => parse({ num_hidden_layers: layers })).toThrow(
        `Expected an integer between 1 and 1024 for num_hidden_layers in m/config.json but received ${String(layers)} of type number`,
      )
    expect(() => parse({ hidden_size: 65536 * 2 })).toThrow('Expected an integer between 1 and 65536 for hidden_size')
    expect(() => parse({ intermediate_size: 2 ** 40 })).toThrow('Expected an integer between 1 and 262144 for intermediate_size')
    expect(() => parse({ num_attention_heads: 4096, hidden_size: 4096 })).toThrow('Expected an integer between 1 and 1024 for num_attention_heads')
    expect(() => parse({ num_key_value_heads: 8 })).toThrow('Expected an integer between 1 and 4 for num_key_value_heads in m/config.json but received 8')
    expect(() => parse({ head_dim: 4096 })).toThrow('Expected an integer between 2 and 1024 for head_dim')
    expect(() => parse({ hidden_size: 8192, num_attention_heads: 4 })).toThrow(
      'Expected an even integer between 2 and 1024 (hidden_size / num_attention_heads, as head_dim is absent) for hidden_size in m/config.json but received 8192',
    )
    expect(() => parse({ vocab_size: 2 ** 31 })).toThrow('Expected an integer between 1 and 16777216 for vocab_size in m/config.json but received 2147483648')
    expect(() => parse({ max_position_embeddings: 1e12 })).toThrow('Expected an integer between 1 and 16777216 for max_position_embeddings')
  })

  it('shows non-finite numbers as they are', () => {
    expect(() => parse({ hidden_size: Infinity })).toThrow('for hidden_size in m/config.json but received Infinity of type number')
    expect(() => parse({ rms_norm_eps: NaN })).toThrow('for rms_norm_eps in m/config.json but received NaN of type number')
    expect(() => parse({ rope_theta: -Infinity })).toThrow('for rope_theta in m/config.json but received -Infinity of type number')
  })

  it('keeps rope_theta, rms_norm_eps and the llama3 factors in range', () => {
    for (const theta of [1e-300, 0.5, 1, 1e300])
      expect(() => parse({ rope_theta: theta })).toThrow(
        `Expected a number above 1 and at most 1000000000000 for rope_theta in m/config.json but received ${String(theta)} of type number`,
      )
    expect(() => parse({ rope_theta: undefined, rope_parameters: { rope_theta: 1e-300, rope_type: 'default' } })).toThrow(
      'Expected a number above 1 and at most 1000000000000 for rope_parameters.rope_theta in m/config.json but received 1e-300 of type number',
    )
    expect(() => parse({ rms_norm_eps: 2 })).toThrow('Expected a number above 0 and at most 1 for rms_norm_eps in m/config.json but received 2 of type number')
    expect(() => parse({ rms_norm_eps: 0 })).toThrow('Expected a number above 0 and at most 1 for rms_norm_eps')
    const llama3 = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 }
    expect(() => parse({ rope_scaling: { ...llama3, factor: 1e308 } })).toThrow(
      'Expected a number above 0 and at most 1000000 for rope_scaling.factor in m/config.json but received 1e+308 of type number',
    )
  })

  it('refuses special token ids outside the vocabulary', () => {
    expect(() => parse({ eos_token_id: 1e9 })).toThrow(
      'Expected a token id below 300 (the vocab_size) or an array of them for eos_token_id in m/config.json but received 1000000000 of type number',
    )
    expect(() => parse({ eos_token_id: [2, 300] })).toThrow('for eos_token_id in m/config.json but received [2,300] of type array')
    expect(() => parse({ bos_token_id: 300 })).toThrow('Expected a token id below 300 (the vocab_size) or an array of them for bos_token_id')
    expect(() => parse({ pad_token_id: -1 })).toThrow('for pad_token_id in m/config.json but received -1 of type number')
    expect(parse({ pad_token_id: 299, bos_token_id: 0, eos_token_id: 299 }).eosTokenIds).toEqual([299])
  })
})
