// The tiny models the forward-pass tests run: one per architecture, each with its own twist.
import type { TinyModelSpec } from '../helpers/tiny-model.js'

export const ARCHITECTURES: { name: string; spec: TinyModelSpec }[] = [
  {
    name: 'llama (llama3 RoPE scaling, 3 shards)',
    spec: {
      architecture: 'LlamaForCausalLM',
      shards: 3,
      ropeTheta: 500000,
      ropeScaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 },
    },
  },
  { name: 'qwen2 (q/k/v biases, one kv head, f16 weights)', spec: { architecture: 'Qwen2ForCausalLM', numKvHeads: 1, dtype: 'F16' } },
  { name: 'qwen3 (q/k norms, head_dim 32, tied embeddings)', spec: { architecture: 'Qwen3ForCausalLM', headDim: 32, tieWordEmbeddings: true } },
  { name: 'mistral (f32 weights)', spec: { architecture: 'MistralForCausalLM', dtype: 'F32' } },
]
