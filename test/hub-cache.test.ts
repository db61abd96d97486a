// Models by Hugging Face repo id, from a hub cache built here in huggingface_hub's layout: file
// contents in blobs/ named by their sha256, snapshots/<commit>/ of symlinks into ../../blobs (or
// copies, as on systems without symlinks), and refs/<branch or tag> holding a commit hash. The
// library, the CLI and the server all resolve `owner/name[@revision]` through it, offline.
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { homedir, tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { checkModelDir, defaultModelPath, loadModel } from '../lib/api.js'
import { packageVersion } from '../lib/cli/package-info.js'
import { hubCacheDir, parseRepoId } from '../lib/hub-cache.js'
import { hashModelFiles, systemFingerprint } from '../lib/server/fingerprint.js'
import { buildDist, DEVICE, post, root, startServer } from './helpers/server.js'
import { writeTinyModel } from './helpers/tiny-model.js'

const REPO = 'test-org/tiny-shakespeare'
const MAIN = createHash('sha1').update('main').digest('hex')
const V1 = createHash('sha1').update('v1').digest('hex')
const GONE = createHash('sha1').update('gone').digest('hex')
const SHIPPED_FILES = ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
const HUB_VARIABLES = ['HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'XDG_CACHE_HOME'] as const

const repoDir = (cache: string, repoId: string) => join(cache, `models--${repoId.replace('/', '--')}`)
const snapshotDir = (cache: string, repoId: string, commit: string) => join(repoDir(cache, repoId), 'snapshots', commit)

/** `files` of `from` as commit `commit` of `repoId`: blobs named by sha256, linked (or copied) into the snapshot. */
function addSnapshot(cache: string, repoId: string, commit: string, from: string, files: string[], layout: 'symlinks' | 'copies' = 'symlinks') {
  const repo = repoDir(cache, repoId)
  const snapshot = snapshotDir(cache, repoId, commit)
  mkdirSync(join(repo, 'blobs'), { recursive: true })
  mkdirSync(snapshot, { recursive: true })
  for (const name of files) {
    const blob = createHash('sha256').update(readFileSync(join(from, name))).digest('hex')
    copyFileSync(join(from, name), join(repo, 'blobs', blob))
    if (layout === 'symlinks') symlinkSync(join('..', '..', 'blobs', blob), join(snapshot, name))
    else copyFileSync(join(from, name), join(snapshot, name))
  }
}

function setRef(cache: string, repoId: string, ref: string, content: string) {
  const file = join(repoDir(cache, repoId), 'refs', ref)
  mkdirSync(join(file, '..'), { recursive: true })
  writeFileSync(file, content) // huggingface_hub writes the hash without a newline
}

/** Runs `fn` with the hub cache variables set to `vars` (the others unset), then puts them back. */
async function withHubEnv<T>(vars: Partial<Record<(typeof HUB_VARIABLES)[number], string>>, fn: () => T | Promise<T>): Promise<T> {
  const saved = HUB_VARIABLES.map((name) => [name, process.env[name]] as const)
  for (const name of HUB_VARIABLES) delete process.env[name]
  Object.assign(process.env, vars)
  try {
    return await fn()
  } finally {
    for (const [name, value] of saved) {
      if (value === undefined) delete process.env[name]
      else process.env[name] = value
    }
  }
}

let tmp: string
let cache: string // $XDG_CACHE_HOME/huggingface/hub
let tinyDir: string

beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'detinfer-hub-cache-'))
  cache = join(tmp, 'xdg', 'huggingface', 'hub')
  tinyDir = writeTinyModel(join(tmp, 'tiny'), { architecture: 'Qwen3ForCausalLM' }).dir
  addSnapshot(cache, REPO, MAIN, defaultModelPath, SHIPPED_FILES)
  addSnapshot(cache, REPO, V1, tinyDir, readdirSync(tinyDir))
  setRef(cache, REPO, 'main', MAIN)
  setRef(cache, REPO, 'v1', `${V1}\n`)
  setRef(cache, REPO, 'refs/pr/1', V1)
  setRef(cache, REPO, 'gone', GONE)
  setRef(cache, REPO, 'broken', 'not a commit hash')
  addSnapshot(cache, 'test-org/copied', MAIN, defaultModelPath, SHIPPED_FILES, 'copies')
  setRef(cache, 'test-org/copied', 'main', MAIN)
  addSnapshot(cache, 'test-org/partial', MAIN, defaultModelPath, ['model.safetensors', 'tokenizer.json'])
  setRef(cache, 'test-org/partial', 'main', MAIN)
  addSnapshot(cache, 'test-org/config-only', MAIN, defaultModelPath, ['config.json'])
  setRef(cache, 'test-org/config-only', 'main', MAIN)
})

afterAll(() => {
  rmSync(tmp, { recursive: true, force: true })
})

describe('repo ids', () => {
  it.each([
    ['Qwen/Qwen3-0.6B', { repoId: 'Qwen/Qwen3-0.6B', revision: null }],
    ['meta-llama/Llama-3.1-8B-Instruct', { repoId: 'meta-llama/Llama-3.1-8B-Instruct', revision: null }],
    ['a/b', { repoId: 'a/b', revision: null }],
    ['org/model_v2@v1.0', { repoId: 'org/model_v2', revision: 'v1.0' }],
    ['org/model@refs/pr/1', { repoId: 'org/model', revision: 'refs/pr/1' }],
    [`org/model@${MAIN}`, { repoId: 'org/model', revision: MAIN }],
  ])('%s is a repo id', (spec, ref) => {
    expect(parseRepoId(spec)).toEqual(ref)
  })

  it.each([
    'Qwen3-0.6B',
    'a/b/c',
    '/abs/model',
    './Qwen/Qwen3-0.6B',
    'Qwen/',
    '-org/model',
    'org./model',
    'org/model-',
    'org/.model',
    'org--x/model',
    'org/mo..del',
    'org/mo del',
    `org/${'m'.repeat(97)}`,
    'org/model@',
    'org/model@../../x',
    'org/model@.hidden',
    'org/model@v1@v2',
  ])('%s is not a repo id', (spec) => {
    expect(parseRepoId(spec)).toBeNull()
  })
})

describe('the cache directory', () => {
  it('follows HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, then ~/.cache, as huggingface_hub does', () => {
    const all = { HF_HUB_CACHE: '/c/hub', HUGGINGFACE_HUB_CACHE: '/c/legacy', HF_HOME: '/c/home', XDG_CACHE_HOME: '/c/xdg' }
    expect(hubCacheDir(all)).toBe('/c/hub')
    expect(hubCacheDir({ ...all, HF_HUB_CACHE: undefined })).toBe('/c/legacy')
    expect(hubCacheDir({ HF_HOME: '/c/home', XDG_CACHE_HOME: '/c/xdg' })).toBe('/c/home/hub')
    expect(hubCacheDir({ XDG_CACHE_HOME: '/c/xdg' })).toBe('/c/xdg/huggingface/hub')
    expect(hubCacheDir({})).toBe(join(homedir(), '.cache', 'huggingface', 'hub'))
    // ~ is the home directory; an empty variable counts as unset; a relative one is made absolute.
    expect(hubCacheDir({ HF_HOME: '~/hf' })).toBe(join(homedir(), 'hf', 'hub'))
    expect(hubCacheDir({ HF_HUB_CACHE: '~' })).toBe(homedir())
    expect(hubCacheDir({ HF_HUB_CACHE: '', HF_HOME: '/c/home' })).toBe('/c/home/hub')
    expect(hubCacheDir({ HF_HUB_CACHE: 'rel/hub' })).toBe(resolve('rel/hub'))
  })

  it('expands $NAME and ${NAME} in the variables, as huggingface_hub does (os.path.expandvars)', () => {
    // As a systemd unit or an .env file passes them: no shell has expanded them.
    expect(hubCacheDir({ HF_HOME: '$BASE/hf', BASE: '/c' })).toBe('/c/hf/hub')
    expect(hubCacheDir({ HF_HUB_CACHE: '${BASE}/hub', BASE: '/c' })).toBe('/c/hub')
    expect(hubCacheDir({ XDG_CACHE_HOME: '$BASE/cache', BASE: '/c' })).toBe('/c/cache/huggingface/hub')
    // Expanded before ".." is resolved; an unset variable stays as written.
    expect(hubCacheDir({ HF_HOME: '$BASE/../x', BASE: '/c/d' })).toBe('/c/x/hub')
    expect(hubCacheDir({ HF_HUB_CACHE: '/c/$UNSET/hub' })).toBe('/c/$UNSET/hub')
  })

  it('is found through the process environment: HF_HUB_CACHE over HF_HOME over XDG_CACHE_HOME', async () => {
    const main = snapshotDir(cache, REPO, MAIN)
    const empty = join(tmp, 'empty')
    await withHubEnv({ XDG_CACHE_HOME: join(tmp, 'xdg') }, () => expect(checkModelDir(REPO)).toBe(main))
    await withHubEnv({ XDG_CACHE_HOME: join(tmp, 'xdg'), HF_HOME: empty }, () =>
      expect(() => checkModelDir(REPO)).toThrow(`not in the Hugging Face cache (${join(empty, 'hub', 'models--test-org--tiny-shakespeare')})`),
    )
    await withHubEnv({ HF_HOME: join(tmp, 'xdg', 'huggingface') }, () => expect(checkModelDir(REPO)).toBe(main))
    await withHubEnv({ HF_HOME: empty, HF_HUB_CACHE: cache }, () => expect(checkModelDir(REPO)).toBe(main))
    await withHubEnv({ HF_HUB_CACHE: empty, HF_HOME: join(tmp, 'xdg', 'huggingface') }, () =>
      expect(() => checkModelDir(REPO)).toThrow(`not in the Hugging Face cache (${join(empty, 'models--test-org--tiny-shakespeare')})`),
    )
  })
})

describe('loading by repo id', () => {
  it('gives the completion of the same files loaded as a directory; Model.path is the snapshot', async () => {
    await withHubEnv({ HF_HUB_CACHE: cache }, async () => {
      const byId = await loadModel(REPO, { device: 'cpu' })
      const byDir = await loadModel(defaultModelPath, { device: 'cpu' })
      try {
        expect(byId.path).toBe(snapshotDir(cache, REPO, MAIN))
        const [a, b] = await Promise.all([byId.generate('ROMEO:', { maxTokens: 8 }), byDir.generate('ROMEO:', { maxTokens: 8 })])
        expect(a.tokens).toHaveLength(8)
        expect(a.tokens).toEqual(b.tokens)
        expect(a.logprobs).toEqual(b.logprobs)
      } finally {
        await Promise.all([byId.dispose(), byDir.dispose()])
      }
    })
  })

  it('@revision: a branch or tag through refs/ (trailing newline allowed), a nested ref, or a commit hash', async () => {
    await withHubEnv({ HF_HUB_CACHE: cache }, async () => {
      expect(checkModelDir(`${REPO}@main`)).toBe(snapshotDir(cache, REPO, MAIN))
      expect(checkModelDir(`${REPO}@v1`)).toBe(snapshotDir(cache, REPO, V1))
      expect(checkModelDir(`${REPO}@refs/pr/1`)).toBe(snapshotDir(cache, REPO, V1))
      expect(checkModelDir(`${REPO}@${V1}`)).toBe(snapshotDir(cache, REPO, V1))
      expect(checkModelDir(`${REPO}@${MAIN}`)).toBe(snapshotDir(cache, REPO, MAIN))
      const v1 = await loadModel(`${REPO}@v1`, { device: 'cpu' })
      try {
        expect(v1.path).toBe(snapshotDir(cache, REPO, V1))
        expect(v1.vocabSize).toBe(273) // the tiny model's, not the shipped one's
      } finally {
        await v1.dispose()
      }
    })
  })

  it('reads a snapshot of copies (no symlinks) too, and fingerprints a snapshot as the directory of the same files', async () => {
    await withHubEnv({ HF_HUB_CACHE: cache }, async () => {
      expect(checkModelDir('test-org/copied')).toBe(snapshotDir(cache, 'test-org/copied', MAIN))
      const [dir, linked, copied] = await Promise.all(
        [defaultModelPath, snapshotDir(cache, REPO, MAIN), snapshotDir(cache, 'test-org/copied', MAIN)].map(hashModelFiles),
      )
      expect(linked).toBe(dir)
      expect(copied).toBe(dir)
    })
  })

  it('an existing path is a path, even named like a repo id in the cache', async () => {
    const cwd = process.cwd()
    const work = mkdtempSync(join(tmp, 'cwd-'))
    mkdirSync(join(work, 'test-org', 'tiny-shakespeare'), { recursive: true })
    mkdirSync(join(work, 'test-org', 'copied'), { recursive: true })
    copyFileSync(join(tinyDir, 'config.json'), join(work, 'test-org', 'tiny-shakespeare', 'config.json'))
    process.chdir(work)
    try {
      await withHubEnv({ HF_HUB_CACHE: cache }, () => {
        expect(checkModelDir(REPO)).toBe(REPO)
        // A directory without config.json is still a path: today's message, not the cache's snapshot.
        expect(() => checkModelDir('test-org/copied')).toThrow(
          'No model at test-org/copied: expected a Hugging Face model directory with config.json, weights and tokenizer.json',
        )
      })
    } finally {
      process.chdir(cwd)
    }
  })
})

describe('not found', () => {
  const download = 'detinfer does not download models: run'
  const cases = (): [string, string][] => [
    [
      'nobody/nothing',
      `No model at nobody/nothing: no such directory, and not in the Hugging Face cache (${repoDir(cache, 'nobody/nothing')}); ` +
        `${download} \`hf download nobody/nothing\` first`,
    ],
    [
      `${REPO}@v2`,
      `No model at ${REPO}@v2: no such directory, and the Hugging Face cache has no revision v2 of ${REPO} ` +
        `(no ${join(repoDir(cache, REPO), 'refs', 'v2')}; cached revisions: broken, gone, main, refs/pr/1, v1); ` +
        `${download} \`hf download ${REPO} --revision v2\` first`,
    ],
    [
      `${REPO}@${'0'.repeat(40)}`,
      `No model at ${REPO}@${'0'.repeat(40)}: no such directory, and the Hugging Face cache has no snapshot of ${REPO} at commit ${'0'.repeat(40)} ` +
        `(no ${snapshotDir(cache, REPO, '0'.repeat(40))}); ${download} \`hf download ${REPO} --revision ${'0'.repeat(40)}\` first`,
    ],
    [
      `${REPO}@gone`,
      `No model at ${REPO}@gone: no such directory, and the Hugging Face cache has no snapshot of ${REPO} at gone (commit ${GONE}) ` +
        `(no ${snapshotDir(cache, REPO, GONE)}); ${download} \`hf download ${REPO} --revision gone\` first`,
    ],
    [`${REPO}@broken`, `No model at ${REPO}@broken: ${join(repoDir(cache, REPO), 'refs', 'broken')} does not hold a commit hash (40 hex digits)`],
    [
      'test-org/partial',
      `No model at test-org/partial: the Hugging Face cache's snapshot of test-org/partial (${snapshotDir(cache, 'test-org/partial', MAIN)}) ` +
        `has no config.json, a partial download; ${download} \`hf download test-org/partial\` to complete it`,
    ],
    [
      'test-org/config-only',
      `No model at test-org/config-only: the Hugging Face cache's snapshot of test-org/config-only (${snapshotDir(cache, 'test-org/config-only', MAIN)}) ` +
        `has no tokenizer.json, no model.safetensors (or model.safetensors.index.json), a partial download; ${download} \`hf download test-org/config-only\` to complete it`,
    ],
    // Not repo ids: the message of a missing directory, as before.
    ['/nonexistent/model', 'No model at /nonexistent/model: expected a Hugging Face model directory with config.json, weights and tokenizer.json'],
    ['./test-org/nothing', 'No model at ./test-org/nothing: expected a Hugging Face model directory with config.json, weights and tokenizer.json'],
    ['a/b/c', 'No model at a/b/c: expected a Hugging Face model directory with config.json, weights and tokenizer.json'],
  ]

  it('says what is missing: the repo, the revision (naming those cached), the snapshot, a commit hash, the files of a partial download', async () => {
    await withHubEnv({ HF_HUB_CACHE: cache }, async () => {
      for (const [spec, message] of cases()) {
        expect(() => checkModelDir(spec), spec).toThrow(message)
        await expect(loadModel(spec), spec).rejects.toThrow(message)
      }
    })
  })
})

describe('the CLI and the server, by repo id', () => {
  const cli = join(root, 'dist', 'cli', 'main.js')
  const detinfer = (args: string[]) => {
    const r = spawnSync(process.execPath, [cli, ...args], { cwd: root, encoding: 'utf8', env: { ...process.env, CI: '1', HF_HUB_CACHE: cache } })
    return { code: r.status, stdout: r.stdout, stderr: r.stderr }
  }

  beforeAll(() => buildDist())

  it('generate --model owner/name prints what the directory gives, under the repo id; a missing one fails in one line', () => {
    const args = ['generate', '--device', 'cpu', '-n', '8', '--json', 'ROMEO:']
    const byId = detinfer([...args, '--model', REPO])
    const byDir = detinfer([...args, '--model', defaultModelPath])
    expect(byId.code, byId.stderr).toBe(0)
    const [a, b] = [JSON.parse(byId.stdout), JSON.parse(byDir.stdout)]
    expect(a.model).toBe(REPO)
    expect(a.tokens).toEqual(b.tokens)
    expect(a.logprobs).toEqual(b.logprobs)
    const missing = detinfer([...args, '--model', 'nobody/nothing'])
    expect(missing.code).toBe(1)
    expect(missing.stderr).toBe(
      `detinfer: No model at nobody/nothing: no such directory, and not in the Hugging Face cache (${repoDir(cache, 'nobody/nothing')}); ` +
        'detinfer does not download models: run `hf download nobody/nothing` first\n',
    )
  })

  it('serve --model owner/name serves it under the repo id, with the fingerprint of the same files as a directory', async () => {
    const server = await startServer(['--model', REPO], { HF_HUB_CACHE: cache })
    try {
      const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: { id: string }[] }
      expect(models.data.map((m) => m.id)).toEqual([REPO])
      expect(((await (await fetch(`${server.url}/v1/models/${REPO}`)).json()) as { id: string }).id).toBe(REPO)
      const health = (await (await fetch(`${server.url}/health`)).json()) as { model: string; system_fingerprint: string }
      expect(health.model).toBe(REPO)
      expect(health.system_fingerprint).toBe(systemFingerprint(await hashModelFiles(defaultModelPath), packageVersion(), DEVICE))
      const r = await post(`${server.url}/v1/completions`, { model: REPO, prompt: 'ROMEO:', max_tokens: 4 })
      expect(r.status, r.text).toBe(200)
      expect(r.json.model).toBe(REPO)
      expect(server.log()).toContain(`ready: ${REPO} (${snapshotDir(cache, REPO, MAIN)}) on ${DEVICE}`)
    } finally {
      expect(await server.stop()).toBe(0)
    }
  })
})
