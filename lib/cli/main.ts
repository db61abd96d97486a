#!/usr/bin/env node
// The `detinfer` command. Each subcommand lives in its own file and is registered below.
// Results go to stdout; progress, diagnostics and errors to stderr. A failure prints one line
// (no stack trace) and exits with status 1.
import { Command } from 'commander'
import { checkCommand } from './check.js'
import { generateCommand } from './generate.js'
import { infoCommand } from './info.js'
import { scoreCommand } from './score.js'
import { serveCommand } from './serve.js'
import { packageVersion } from './package-info.js'

// Output piped into a reader that stops early (`detinfer generate ... | head -1`): stop quietly, as
// command-line tools do, instead of failing on the write.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0)
  throw err
})
// Diagnostics whose reader went away (`detinfer generate ... 2>&1 >out.txt | head -1`): the
// progress and messages are lost, the work and its output on stdout go on.
process.stderr.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE' || err.code === 'ERR_STREAM_DESTROYED') return
  throw err
})

const program = new Command('detinfer')
  .description('Deterministic LLM inference: the same prompt gives the same completion, bit for bit')
  .version(packageVersion())
  .showHelpAfterError('(run with --help for usage)')

// Subcommands: generate, score, check, serve, info.
for (const command of [generateCommand(), scoreCommand(), checkCommand(), serveCommand(), infoCommand()]) program.addCommand(command)

try {
  await program.parseAsync(process.argv)
} catch (err) {
  const message = err instanceof Error ? err.message : String(err)
  process.stderr.write(`detinfer: ${message.replace(/^detinfer: /, '')}\n`)
  process.exitCode = 1
}
