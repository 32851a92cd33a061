// Implements: the seeded random number generator the model zoo uses for parameter
// init, dropout-free sampling and text generation. Deterministic across platforms
// (32-bit integer arithmetic only), so a run is reproducible from its printed seed.
// Owns: the generator and its serialisable state. Does not own: data shuffling
// policy (the loader) or tensor-level randomness (tfjs' own seeded ops are not used).
//
// Algorithm: sfc32 (Chris Doty-Humphrey's Small Fast Counting generator), seeded
// through splitmix32 so that nearby seeds (0, 1, 2, ...) give unrelated streams.

/** splitmix32 step: a good 32-bit mixer for turning a seed into generator state. */
const splitmix32 = (x: number): number => {
  x = (x + 0x9e3779b9) | 0
  let z = x
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b)
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35)
  return (z ^ (z >>> 16)) >>> 0
}

export type RngState = readonly [number, number, number, number]

export class Rng {
  private a: number
  private b: number
  private c: number
  private d: number

  constructor(seed: number) {
    // Fold the seed (any finite number, including > 2^32) into 32 bits.
    let s = (Math.floor(seed) | 0) ^ Math.floor(seed / 4294967296)
    const next = (): number => {
      s = (s + 0x9e3779b9) | 0
      return splitmix32(s)
    }
    this.a = next()
    this.b = next()
    this.c = next()
    this.d = next()
    for (let i = 0; i < 12; i++) this.nextU32() // warm up
  }

  static fromState(state: RngState): Rng {
    const r = new Rng(0)
    ;[r.a, r.b, r.c, r.d] = state
    return r
  }

  /** The generator's state, enough to resume the exact stream (for checkpoints). */
  state(): RngState {
    return [this.a, this.b, this.c, this.d]
  }

  /** Uniform 32-bit unsigned integer. */
  nextU32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0
    this.d = (this.d + 1) | 0
    this.a = this.b ^ (this.b >>> 9)
    this.b = (this.c + (this.c << 3)) | 0
    this.c = (this.c << 21) | (this.c >>> 11)
    this.c = (this.c + t) | 0
    return t >>> 0
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return this.nextU32() / 4294967296
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.uniform() * n)
  }

  /** Standard normal (Box-Muller; the second value of the pair is dropped so that
   *  the four-word state() is the whole state). */
  normal(): number {
    let u = this.uniform()
    while (u === 0) u = this.uniform()
    const v = this.uniform()
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v)
  }

  /** Fill `out` with normal(0, std) samples. */
  fillNormal(out: Float32Array, std: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = this.normal() * std
    return out
  }

  /** Fill `out` with uniform(-limit, limit) samples. */
  fillUniform(out: Float32Array, limit: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = (2 * this.uniform() - 1) * limit
    return out
  }
}
