// Reading files (a model directory's, the CLI's prompt files): only regular files, with errors
// that name the path. A FIFO would block open() forever and a directory fails with a bare
// EISDIR, so both are refused before any read.
import { constants } from 'node:fs'
import { open, realpath, stat, type FileHandle } from 'node:fs/promises'
import { basename, sep } from 'node:path'

/** The largest text file read whole (tokenizer.json of the largest vocabularies is ~30 MB). */
export const MAX_TEXT_FILE_BYTES = 512 * 2 ** 20

function kindOf(s: { isDirectory(): boolean; isFIFO(): boolean; isSocket(): boolean; isCharacterDevice(): boolean; isBlockDevice(): boolean }): string {
  if (s.isDirectory()) return 'a directory'
  if (s.isFIFO()) return 'a FIFO (named pipe)'
  if (s.isSocket()) return 'a socket'
  if (s.isCharacterDevice() || s.isBlockDevice()) return 'a device'
  return 'not a regular file'
}

const KERNEL_FILES = ['/proc', '/sys']

function notRegular(name: string, path: string, kind: string): Error {
  return new Error(`Expected a regular file for ${name} but ${path} is ${kind}`)
}

/**
 * Opens `path` for reading if it is a regular file. `name` says what it is in messages (the
 * file's name by default, or an option such as --prompt-file): `<name> not found: <path> does
 * not exist`, `Expected a regular file for <name> but <path> is a directory`.
 */
export async function openRegularFile(path: string, name = basename(path)): Promise<FileHandle> {
  let info
  try {
    info = await stat(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`${name} not found: ${path} does not exist`)
    throw new Error(`Could not open ${path}: ${(err as Error).message}`)
  }
  if (!info.isFile()) throw notRegular(name, path, kindOf(info))
  // The kernel's files (/proc/self/environ, say) look regular, report a size of 0 and hold the
  // process's secrets: a model file linked to one would pass them into prompts or messages.
  const real = await realpath(path).catch(() => path)
  if (KERNEL_FILES.some((root) => real === root || real.startsWith(root + sep)))
    throw notRegular(name, path, `a kernel file (${real})`)
  let handle: FileHandle
  try {
    // O_NONBLOCK: should the path have become a FIFO since the stat, open() returns at once.
    handle = await open(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0))
  } catch (err) {
    throw new Error(`Could not open ${path}: ${(err as Error).message}`)
  }
  const opened = await handle.stat()
  if (!opened.isFile()) {
    await handle.close()
    throw notRegular(name, path, kindOf(opened))
  }
  return handle
}

/** Whether `path` exists at all (a directory or a FIFO counts: opening it then says what it is). */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await stat(path)
    return true
  } catch {
    return false
  }
}

/** The whole text of a regular file of at most MAX_TEXT_FILE_BYTES. */
export async function readTextFile(path: string, name = basename(path)): Promise<string> {
  const handle = await openRegularFile(path, name)
  try {
    const { size } = await handle.stat()
    if (size > MAX_TEXT_FILE_BYTES)
      throw new Error(`${path} is ${size} bytes; text files are read whole up to ${MAX_TEXT_FILE_BYTES} bytes`)
    return await handle.readFile('utf8').catch((err: Error) => {
      throw new Error(`Could not read ${path}: ${err.message}`)
    })
  } finally {
    await handle.close()
  }
}

/** Reads a JSON file with errors that name it (missing, not a regular file, unreadable, not JSON). */
export async function readJsonFile(file: string): Promise<unknown> {
  const text = await readTextFile(file)
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new Error(`${file} is not valid JSON: ${(err as Error).message}`)
  }
}
