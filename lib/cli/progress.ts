// Loading progress on stderr: a bar when a person is watching (stderr is a terminal and CI is
// unset), a few plain lines otherwise, so logs stay readable. stdout is left to the generated text.
import cliProgress from 'cli-progress'

export interface LoadProgressReporter {
  update(loadedBytes: number, totalBytes: number): void
  /** Loading finished (`ok`) or failed. */
  done(ok: boolean): void
}

export function interactiveStderr(): boolean {
  return process.stderr.isTTY === true && !process.env.CI
}

const MiB = 1024 * 1024

export function loadProgressReporter(what: string): LoadProgressReporter {
  if (interactiveStderr()) {
    const bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format: `Loading ${what} [{bar}] {percentage}% | {loadedMiB}/{totalMiB} MiB | ETA {eta}s`,
        hideCursor: true,
        clearOnComplete: true,
      },
      cliProgress.Presets.shades_classic,
    )
    let started = false
    return {
      update(loaded, total) {
        const payload = { loadedMiB: (loaded / MiB).toFixed(0), totalMiB: (total / MiB).toFixed(0) }
        if (!started) {
          bar.start(total, loaded, payload)
          started = true
        } else bar.update(loaded, payload)
      },
      done() {
        if (started) bar.stop()
      },
    }
  }
  // Plain lines at 0, 25, 50, 75 and 100%.
  let nextQuarter = 0
  const started = performance.now()
  return {
    update(loaded, total) {
      const quarter = total > 0 ? Math.floor((4 * loaded) / total) : 4
      if (quarter < nextQuarter) return
      process.stderr.write(`Loading ${what}: ${quarter * 25}% (${(loaded / MiB).toFixed(0)} of ${(total / MiB).toFixed(0)} MiB)\n`)
      nextQuarter = quarter + 1
    },
    done(ok) {
      if (ok) process.stderr.write(`Loaded ${what} in ${((performance.now() - started) / 1000).toFixed(1)} s\n`)
    },
  }
}

/** Runs `load` with a progress reporter for `what`, closing the report whether it succeeds or fails. */
export async function withLoadProgress<T>(
  what: string,
  load: (onProgress: (p: { loadedBytes: number; totalBytes: number }) => void) => Promise<T>,
): Promise<T> {
  const progress = loadProgressReporter(what)
  try {
    const result = await load((p) => progress.update(p.loadedBytes, p.totalBytes))
    progress.done(true)
    return result
  } catch (err) {
    progress.done(false)
    throw err
  }
}
