// A worker thread that runs CommonJS code given as text (evaluated: the same text works from
// lib/*.ts under a test runner and from dist/*.js), answering over a port of its own. The
// tokenizer's encode worker and the grammar engine's schema checker each keep one, and a queue in
// front of it; this is the part they share: starting it, holding the process open only while it
// has work, and stopping it.
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads'

export interface EvalWorkerOptions<Reply> {
  /**
   * The worker's code. It finds its port at `workerData.port`, posts `{ ready: true }` on it once
   * it can take work, then one reply for each message it is sent.
   */
  source: string
  /** The rest of its workerData (plain data). */
  data: Record<string, unknown>
  /** The worker in error messages: "The tokenizer's worker thread". */
  name: string
  /** What an exit cuts short, ending "<name> exited before ...": "the text was encoded". */
  exitedBefore: string
  /** How long the worker may take to post `{ ready: true }`. */
  startupTimeoutMs: number
  /**
   * Whether what the worker prints stays out of the process's output: its stdout and stderr are
   * streams here that nothing reads (Node holds the process open while a worker's stream is read,
   * whatever idle() says). A worker that prints much would wait on them; those that are quiet
   * replace their console, so they print next to nothing.
   */
  quiet: boolean
  /** Each reply, `{ ready: true }` included. */
  onReply: (reply: Reply) => void
  /** The worker failed, exited, or did not start in time; also called for the exit that stop() causes. */
  onFail: (err: Error) => void
}

export class EvalWorker<Reply extends { ready?: true }> {
  private readonly worker: Worker
  private readonly port: MessagePort

  constructor(o: EvalWorkerOptions<Reply>) {
    const { port1, port2 } = new MessageChannel()
    this.port = port1
    this.worker = new Worker(o.source, {
      eval: true,
      workerData: { ...o.data, port: port2 },
      transferList: [port2],
      // Not the process's flags (see chat-template.ts: `node --input-type=module -e`).
      execArgv: [],
      // true: the worker's output is a stream here, not piped to process.stdout and stderr.
      stdout: o.quiet,
      stderr: o.quiet,
    })
    const startup = setTimeout(() => o.onFail(new Error(`${o.name} did not start within ${o.startupTimeoutMs / 1000} s`)), o.startupTimeoutMs)
    startup.unref()
    port1.on('message', (reply: Reply) => {
      if (reply.ready) clearTimeout(startup)
      o.onReply(reply)
    })
    this.worker.on('error', (err) => {
      clearTimeout(startup)
      o.onFail(new Error(`${o.name} failed: ${err.message}`))
    })
    this.worker.on('exit', () => {
      clearTimeout(startup)
      o.onFail(new Error(`${o.name} exited before ${o.exitedBefore}`))
    })
  }

  /** Sends work; the worker holds the process open until idle(). */
  post(message: unknown): void {
    this.worker.ref()
    this.port.ref()
    this.port.postMessage(message)
  }

  /** Lets the process exit while the worker waits for work. */
  idle(): void {
    this.worker.unref()
    this.port.unref()
  }

  /** A reply the worker posted that this thread has not read yet (it was busy), if there is one. */
  takePosted(): Reply | undefined {
    return receiveMessageOnPort(this.port)?.message as Reply | undefined
  }

  stop(): void {
    this.port.close()
    void this.worker.terminate()
  }
}
