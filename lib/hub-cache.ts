// Models by Hugging Face repo id, from the local hub cache that `hf download`, huggingface_hub and
// transformers fill. Offline only: a model that is not in the cache is an error that says how to
// download it; nothing here touches the network.
//
// The cache, as huggingface_hub lays it out (file_download.py, try_to_load_from_cache):
//   <cache>/models--<owner>--<name>/refs/<revision>   the commit hash a branch or tag points to
//   <cache>/models--<owner>--<name>/snapshots/<hash>/ that commit's files: symlinks into
//                                                      ../../blobs/, or copies where symlinks fail
// A revision with no file under refs/ is taken as a commit hash itself.
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { homedir } from 'node:os'
import { join, resolve, sep } from 'node:path'

/** A repo id `owner/name` and the revision after its `@`, if any. */
export interface HubModelRef {
  repoId: string
  revision: string | null
}

// Hugging Face's repo names: letters, digits, '-', '_' and '.', beginning and ending with a
// letter, digit or '_', without '--' (the cache's separator) or '..'; a name has 96 characters at most.
const REPO_PART = /^[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$/
const MAX_REPO_NAME = 96
// A branch or tag (slashes allowed, as in refs/pr/1; no part may begin with '.'), or a commit hash.
const REVISION = /^[A-Za-z0-9_-][A-Za-z0-9._-]*(?:\/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$/
const COMMIT_HASH = /^[0-9a-f]{40}$/
const DEFAULT_REVISION = 'main'
/** A refs file holds one commit hash; anything larger is not one. */
const MAX_REF_BYTES = 256
/** Folders under refs/ listed in messages at most this deep (refs/pr/1 is two). */
const MAX_REF_DEPTH = 4

/** `owner/name` or `owner/name@revision` as a repo id and revision; null for anything else. */
export function parseRepoId(spec: string): HubModelRef | null {
  const at = spec.indexOf('@')
  const repoId = at < 0 ? spec : spec.slice(0, at)
  const revision = at < 0 ? null : spec.slice(at + 1)
  const parts = repoId.split('/')
  if (parts.length !== 2 || !parts.every((p) => REPO_PART.test(p) && !p.includes('--') && !p.includes('..'))) return null
  if (parts[1]!.length > MAX_REPO_NAME) return null
  if (revision !== null && (!REVISION.test(revision) || revision.includes('..'))) return null
  return { repoId, revision }
}

/**
 * The hub cache's root, as huggingface_hub finds it: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE
 * (its older name), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
 * ~/.cache/huggingface/hub. A leading ~ means the home directory, and $NAME or ${NAME} a variable
 * of `env` (os.path.expanduser, then os.path.expandvars, as constants.py does: a systemd unit or
 * an .env file passes HF_HOME=$HOME/hf as written); an empty variable counts as unset.
 */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const set = (name: string) => (env[name] ? env[name] : undefined)
  const expand = (path: string) => expandVariables(expandHome(path), env)
  // Joined as text, not with join(): "$X/.." must expand before ".." is resolved, as in Python.
  const home = expand(set('HF_HOME') ?? `${set('XDG_CACHE_HOME') ?? join(homedir(), '.cache')}${sep}huggingface`)
  return resolve(expand(set('HF_HUB_CACHE') ?? set('HUGGINGFACE_HUB_CACHE') ?? `${home}${sep}hub`))
}

function expandHome(path: string): string {
  return path === '~' || path.startsWith('~/') ? join(homedir(), path.slice(1)) : path
}

/** $NAME and ${NAME} replaced by the variable's value; an unset one stays as written (posixpath.expandvars). */
function expandVariables(path: string, env: NodeJS.ProcessEnv): string {
  return path.replace(/\$(?:(\w+)|\{([^}]+)\})/g, (text, bare: string | undefined, braced: string | undefined) => env[bare ?? braced!] ?? text)
}

/**
 * The snapshot directory that `spec` (the text the user gave, for messages) names in the cache at
 * `cacheDir`, holding config.json, tokenizer.json and weights; otherwise one error that says what is missing.
 */
export function hubSnapshotDir(spec: string, ref: HubModelRef, cacheDir: string = hubCacheDir()): string {
  const { repoId } = ref
  const revision = ref.revision ?? DEFAULT_REVISION
  const download = `hf download ${repoId}${ref.revision === null ? '' : ` --revision ${revision}`}`
  const missing = (what: string) =>
    new Error(`No model at ${spec}: no such directory, and ${what}; detinfer does not download models: run \`${download}\` first`)

  const repoDir = join(cacheDir, `models--${repoId.replace('/', '--')}`)
  if (!isDirectory(repoDir)) throw missing(`not in the Hugging Face cache (${repoDir})`)

  const refFile = join(repoDir, 'refs', revision)
  let commit: string
  if (isFile(refFile)) {
    commit = readRef(refFile, spec)
  } else if (COMMIT_HASH.test(revision)) {
    commit = revision
  } else {
    const known = cachedRevisions(join(repoDir, 'refs'))
    throw missing(`the Hugging Face cache has no revision ${revision} of ${repoId} (no ${refFile}; cached revisions: ${known.join(', ') || 'none'})`)
  }

  const snapshot = join(repoDir, 'snapshots', commit)
  if (!isDirectory(snapshot)) {
    const at = commit === revision ? `commit ${commit}` : `${revision} (commit ${commit})`
    throw missing(`the Hugging Face cache has no snapshot of ${repoId} at ${at} (no ${snapshot})`)
  }
  // The files every model needs: a download cut short (or limited to some files) lacks some.
  const absent = [
    ...['config.json', 'tokenizer.json'].filter((f) => !isFile(join(snapshot, f))),
    ...(isFile(join(snapshot, 'model.safetensors')) || isFile(join(snapshot, 'model.safetensors.index.json'))
      ? []
      : ['model.safetensors (or model.safetensors.index.json)']),
  ]
  if (absent.length)
    throw new Error(
      `No model at ${spec}: the Hugging Face cache's snapshot of ${repoId} (${snapshot}) has no ${absent.join(', no ')}, ` +
        `a partial download; detinfer does not download models: run \`${download}\` to complete it`,
    )
  return snapshot
}

/** The commit hash a refs file holds (huggingface_hub writes it without a newline; one is allowed). */
function readRef(file: string, spec: string): string {
  const size = statSync(file).size
  const text = size <= MAX_REF_BYTES ? readFileSync(file, 'utf8').trim() : ''
  if (!COMMIT_HASH.test(text)) throw new Error(`No model at ${spec}: ${file} does not hold a commit hash (40 hex digits)`)
  return text
}

/** The revisions under refs/ (branches, tags, and nested ones such as refs/pr/1), sorted. */
function cachedRevisions(refsDir: string, prefix = '', depth = 0): string[] {
  let entries
  try {
    entries = readdirSync(join(refsDir, prefix), { withFileTypes: true })
  } catch {
    return []
  }
  const names = entries.flatMap((e) => {
    const name = prefix ? `${prefix}/${e.name}` : e.name
    if (e.isDirectory()) return depth < MAX_REF_DEPTH ? cachedRevisions(refsDir, name, depth + 1) : []
    return e.isFile() ? [name] : []
  })
  return names.sort()
}

// A path that cannot be stat'ed (missing, a file where a folder should be, unreadable) is neither.
function kindOf(path: string): 'directory' | 'file' | null {
  try {
    const s = statSync(path)
    return s.isDirectory() ? 'directory' : s.isFile() ? 'file' : null
  } catch {
    return null
  }
}

function isDirectory(path: string): boolean {
  return kindOf(path) === 'directory'
}

function isFile(path: string): boolean {
  return kindOf(path) === 'file'
}
