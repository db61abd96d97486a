// Comparisons for tests: bitwise equality that reports the first differing index, and relative
// error against a float64 reference.
export function firstDifference(a: ArrayBufferView, b: ArrayBufferView): number {
  const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength)
  const y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength)
  if (x.length !== y.length) return Math.min(x.length, y.length)
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i
  return -1
}

/** ‖out − ref‖ / ‖ref‖ (Frobenius); NaN anywhere gives Infinity. */
export function relativeError(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  let num = 0
  let den = 0
  for (let i = 0; i < ref.length; i++) {
    const o = out[i]!
    const r = ref[i]!
    if (Number.isNaN(o) || Number.isNaN(r)) return Infinity
    num += (o - r) * (o - r)
    den += r * r
  }
  return Math.sqrt(num / (den || 1))
}
