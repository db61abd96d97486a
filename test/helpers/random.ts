// Seeded random inputs for tests (never zeros): a small counter-based generator so every test
// can rebuild its inputs from a seed.
import { mulberry32 } from '../../lib/determinism-check.js'

export { mulberry32 }

/** Uniform values in [-scale, scale), none exactly zero. */
export function randomArray(n: number, seed: number, scale = 1): Float32Array {
  const rand = mulberry32(seed)
  const out = new Float32Array(n)
  for (let i = 0; i < n; i++) {
    let v = (rand() * 2 - 1) * scale
    if (v === 0) v = scale * 1e-3
    out[i] = v
  }
  return out
}

/** Normal-ish values (sum of uniforms), mean 0, std `std`. */
export function randomNormal(n: number, seed: number, std = 1): Float32Array {
  const rand = mulberry32(seed)
  const out = new Float32Array(n)
  for (let i = 0; i < n; i++) {
    const v = (rand() + rand() + rand() + rand() - 2) * Math.sqrt(3) * std
    out[i] = v === 0 ? std * 1e-3 : v
  }
  return out
}

export function randomInts(n: number, seed: number, max: number): Int32Array {
  const rand = mulberry32(seed)
  return Int32Array.from({ length: n }, () => Math.floor(rand() * max))
}

/** Arrays of inputs one after another, as the rows of one tensor. */
export function concatRows(rows: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(rows.reduce((s, r) => s + r.length, 0))
  let at = 0
  for (const r of rows) {
    out.set(r, at)
    at += r.length
  }
  return out
}
