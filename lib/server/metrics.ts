// Prometheus metrics of one server (GET /metrics), in a registry of their own so that two servers
// in one process do not mix. Gauges of the scheduler's state are read when scraped.
import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { Model } from '../api.js'

export class ServerMetrics {
  readonly registry = new Registry()
  readonly requests: Counter<'endpoint' | 'status'>
  readonly promptTokens: Counter
  readonly completionTokens: Counter
  readonly timeToFirstToken: Histogram
  readonly interTokenLatency: Histogram
  readonly requestDuration: Histogram<'endpoint'>
  private model: Model | null = null

  constructor() {
    const registers = [this.registry]
    this.requests = new Counter({
      name: 'detinfer_requests_total',
      help: 'HTTP requests answered, by endpoint and status code',
      labelNames: ['endpoint', 'status'] as const,
      registers,
    })
    this.promptTokens = new Counter({ name: 'detinfer_prompt_tokens_total', help: 'Prompt tokens of served completions (once per request, as usage.prompt_tokens counts them)', registers })
    this.completionTokens = new Counter({ name: 'detinfer_completion_tokens_total', help: 'Tokens generated', registers })
    this.timeToFirstToken = new Histogram({
      name: 'detinfer_time_to_first_token_seconds',
      help: 'From the request arriving to the first generated token of a choice',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    })
    this.interTokenLatency = new Histogram({
      name: 'detinfer_inter_token_latency_seconds',
      help: 'Time between two generated tokens of a choice',
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    })
    this.requestDuration = new Histogram({
      name: 'detinfer_request_duration_seconds',
      help: 'Completion requests from arrival to the last byte of the answer',
      labelNames: ['endpoint'] as const,
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers,
    })
    const load = () => this.model?.load
    const gauge = (name: string, help: string, read: () => number | undefined) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(read() ?? 0)
        },
      })
    gauge('detinfer_queue_depth', 'Sequences submitted and waiting to join the running batch', () => load()?.waiting)
    gauge('detinfer_batch_size', 'Sequences in the running batch', () => load()?.running)
    gauge('detinfer_kv_cache_blocks_used', 'KV-cache blocks held by running sequences', () => load()?.usedBlocks)
    gauge('detinfer_kv_cache_blocks_total', 'KV-cache blocks of the model', () => load()?.totalBlocks)
    gauge('detinfer_prefix_cache_blocks', 'KV-cache blocks kept by the prefix cache for reuse (no sequence holds them)', () => load()?.cachedBlocks)
    const total = (name: string, help: string, read: () => number | undefined) =>
      new Counter({
        name,
        help,
        registers,
        collect() {
          this.reset()
          this.inc(read() ?? 0)
        },
      })
    total('detinfer_prefix_cache_query_tokens_total', 'Prompt tokens of sequences admitted to the batch', () => load()?.promptTokens)
    total(
      'detinfer_prefix_cache_hit_tokens_total',
      'Prompt tokens whose KV-cache blocks came from the prefix cache instead of being computed',
      () => load()?.prefixHitTokens,
    )
    total('detinfer_steps_total', 'Forward steps of the running batch', () => load()?.steps)
    total(
      'detinfer_grammar_mask_wait_seconds_total',
      "Time the batch waited for structured output's grammar masks before its steps (host work the device waits on)",
      () => (load()?.maskWaitMs ?? 0) / 1000,
    )
    gauge('detinfer_process_resident_memory_bytes', 'Resident memory of the server process', () => process.memoryUsage().rss)
    gauge('detinfer_process_heap_used_bytes', 'JavaScript heap in use', () => process.memoryUsage().heapUsed)
    gauge('detinfer_kv_cache_usage_ratio', 'Fraction of the KV-cache blocks held by running sequences', () => {
      const l = load()
      return l && l.totalBlocks ? l.usedBlocks / l.totalBlocks : 0
    })
  }

  attach(model: Model): void {
    this.model = model
  }
}
