// Checks shared/models/lstm-fast.ts lstmFinalState against two independent references:
// the recurrence spelled out as plain tfjs ops with tfjs' own autodiff (the per-step loop
// of lstmLogits in lstm-classifier.ts), forward and gradients w.r.t. xz and U to 1e-5 of
// their largest magnitude, with and without a padding mask; and central finite
// differences of a float64 forward written here. Also: a step that is padding in every
// row, an all-padding batch, bad shapes, and no tensor leaks. Runs on wasm and on cpu
// (the cpu backend shares the arrays handed to tf.tensor, wasm copies them).
// Run: npx vitest run test/lstm-fast.test.ts
import * as tf from "@tensorflow/tfjs"
import { beforeAll, describe, expect, it } from "vitest"
import { initBackend } from "../shared/compute/backend.ts"
import { lstmFinalState } from "../shared/models/lstm-fast.ts"
import { Rng } from "../shared/models/rng.ts"

// Shapes: L steps, B rows, E input width, H units, G = 4H.
const L = 7
const B = 3
const E = 4
const H = 5
const G = 4 * H

/** The plain-op recurrence (as lstmLogits): xz [L, B, G], U [H, G], mask [L, B] -> h_L [B, H]. */
const reference = (xz: tf.Tensor3D, U: tf.Tensor2D, mask?: tf.Tensor2D): tf.Tensor2D => {
  const steps = tf.unstack(xz) as tf.Tensor2D[]
  const masks = mask === undefined ? undefined : (tf.unstack(tf.reshape(mask, [L, B, 1])) as tf.Tensor2D[])
  let h = tf.zeros([B, H]) as tf.Tensor2D
  let cell = tf.zeros([B, H]) as tf.Tensor2D
  for (let t = 0; t < L; t++) {
    const z = tf.add(steps[t], tf.matMul(h, U))
    const [zi, zf, zg, zo] = tf.split(z, 4, 1)
    const cNew = tf.add(tf.mul(tf.sigmoid(zf), cell), tf.mul(tf.sigmoid(zi), tf.tanh(zg))) as tf.Tensor2D
    const hNew = tf.mul(tf.sigmoid(zo), tf.tanh(cNew)) as tf.Tensor2D
    if (masks === undefined) {
      h = hNew
      cell = cNew
    } else {
      const m = masks[t]
      h = tf.add(h, tf.mul(m, tf.sub(hNew, h))) as tf.Tensor2D
      cell = tf.add(cell, tf.mul(m, tf.sub(cNew, cell))) as tf.Tensor2D
    }
  }
  return h
}

/** The same recurrence in float64 plain JS, for finite differences. */
const forward64 = (xz: Float64Array, U: Float64Array, mask?: Float32Array): Float64Array => {
  const sig = (x: number) => 1 / (1 + Math.exp(-x))
  let h = new Float64Array(B * H)
  let c = new Float64Array(B * H)
  for (let t = 0; t < L; t++) {
    const hn = new Float64Array(B * H)
    const cn = new Float64Array(B * H)
    for (let b = 0; b < B; b++) {
      const m = mask === undefined ? 1 : mask[t * B + b]
      const z = new Float64Array(G)
      for (let g = 0; g < G; g++) {
        let s = xz[(t * B + b) * G + g]
        for (let k = 0; k < H; k++) s += h[b * H + k] * U[k * G + g]
        z[g] = s
      }
      for (let j = 0; j < H; j++) {
        const cNew = sig(z[H + j]) * c[b * H + j] + sig(z[j]) * Math.tanh(z[2 * H + j])
        const hNew = sig(z[3 * H + j]) * Math.tanh(cNew)
        cn[b * H + j] = c[b * H + j] + m * (cNew - c[b * H + j])
        hn[b * H + j] = h[b * H + j] + m * (hNew - h[b * H + j])
      }
    }
    h = hn
    c = cn
  }
  return h
}

interface Case {
  readonly xz: Float32Array // [L, B, G]
  readonly U: Float32Array // [H, G]
  readonly w: Float32Array // [B, H]: the loss is Σ w ⊙ h_L, so dy is not uniform
}

/** xz = x·W + b for x [L, B, E] (so xz has the structure of a real input projection),
 *  U scaled so the recurrence matters; forget-gate bias 1 as lstmInit. */
const makeCase = (seed: number): Case => {
  const rng = new Rng(seed)
  const x = Float64Array.from({ length: L * B * E }, () => rng.normal())
  const W = Float64Array.from({ length: E * G }, () => rng.normal() * 0.6)
  const bias = Float64Array.from({ length: G }, (_, g) => (g >= H && g < 2 * H ? 1 : 0) + rng.normal() * 0.1)
  const xz = new Float32Array(L * B * G)
  for (let r = 0; r < L * B; r++) {
    for (let g = 0; g < G; g++) {
      let s = bias[g]
      for (let e = 0; e < E; e++) s += x[r * E + e] * W[e * G + g]
      xz[r * G + g] = s
    }
  }
  return {
    xz,
    U: Float32Array.from({ length: H * G }, () => rng.normal() * 0.5),
    w: Float32Array.from({ length: B * H }, () => rng.normal())
  }
}

/** Row 0 pre-padded (3 steps), row 1 all real, row 2 post-padded and with a hole at t=4;
 *  step 1 is padding in every row (the skipped path). Layout [L, B]. */
const MASK = Float32Array.from({ length: L * B }, (_, i) => {
  const t = Math.floor(i / B)
  const b = i % B
  if (t === 1) return 0
  if (b === 0) return t < 3 ? 0 : 1
  if (b === 2) return t >= 5 || t === 4 ? 0 : 1
  return 1
})

type Fn = (xz: tf.Tensor3D, U: tf.Tensor2D, mask?: tf.Tensor2D) => tf.Tensor2D

/** h_L and the gradients of Σ w ⊙ h_L w.r.t. xz and U, as arrays. */
const run = (fn: Fn, k: Case, mask?: Float32Array) =>
  tf.tidy(() => {
    const xz = tf.tensor3d(k.xz, [L, B, G])
    const U = tf.tensor2d(k.U, [H, G])
    const m = mask === undefined ? undefined : tf.tensor2d(mask, [L, B])
    const w = tf.tensor2d(k.w, [B, H])
    const h = fn(xz, U, m)
    const [gx, gu] = tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(fn(a as tf.Tensor3D, b as tf.Tensor2D, m), w)))([xz, U])
    return { h: Float32Array.from(h.dataSync()), dxz: Float32Array.from(gx.dataSync()), dU: Float32Array.from(gu.dataSync()) }
  })

/** Every |got - want| within tol of want's largest magnitude. */
const expectClose = (got: Float32Array, want: Float32Array, tol: number, what: string) => {
  expect(got.length, what).toBe(want.length)
  let scale = 0
  for (const v of want) scale = Math.max(scale, Math.abs(v))
  let worst = 0
  let at = 0
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i] - want[i])
    if (d > worst) [worst, at] = [d, i]
  }
  expect(scale, `${what}: the reference is all zeros, the check would be vacuous`).toBeGreaterThan(1e-3)
  expect(worst / scale, `${what}: worst at ${at}: ${got[at]} vs ${want[at]} (max |want| ${scale})`).toBeLessThanOrEqual(tol)
}

for (const backend of ["wasm", "cpu"] as const) {
  describe(`lstmFinalState on ${backend}`, () => {
    beforeAll(async () => {
      expect((await initBackend(backend)).name).toBe(backend)
    })

    it("matches the plain-op loop: h_L, d/dxz and d/dU, with a padding mask and without", () => {
      for (const [seed, mask] of [[1, MASK], [2, undefined], [3, MASK]] as const) {
        const k = makeCase(seed)
        const fast = run(lstmFinalState, k, mask)
        const ref = run(reference, k, mask)
        const what = `seed ${seed}, ${mask === undefined ? "no mask" : "mask"}`
        expectClose(fast.h, ref.h, 1e-5, `${what}: h_L`)
        expectClose(fast.dxz, ref.dxz, 1e-5, `${what}: dxz`)
        expectClose(fast.dU, ref.dU, 1e-5, `${what}: dU`)
      }
    })

    it("padding leaves the state alone: padded steps get zero gradient, all-padding gives h = 0", () => {
      const k = makeCase(4)
      const fast = run(lstmFinalState, k, MASK)
      for (let t = 0; t < L; t++) {
        for (let b = 0; b < B; b++) {
          if (MASK[t * B + b] !== 0) continue
          for (let g = 0; g < G; g++) expect(Math.abs(fast.dxz[(t * B + b) * G + g]), `dxz at t=${t} b=${b}`).toBe(0)
        }
      }
      const none = run(lstmFinalState, k, new Float32Array(L * B))
      expect([...none.h].every((v) => v === 0)).toBe(true)
      expect([...none.dxz, ...none.dU].every((v) => v === 0)).toBe(true)
    })

    it("gradients match central finite differences of a float64 forward", () => {
      const k = makeCase(5)
      const { dxz, dU } = run(lstmFinalState, k, MASK)
      const xz64 = Float64Array.from(k.xz)
      const U64 = Float64Array.from(k.U)
      const loss = () => forward64(xz64, U64, MASK).reduce((s, v, i) => s + v * k.w[i], 0)
      const rng = new Rng(9)
      const eps = 1e-5 // float64: truncation ~eps², rounding ~1e-16/eps, both far below float32's
      const probes: string[] = []
      for (const [name, p, g] of [["xz", xz64, dxz], ["U", U64, dU]] as const) {
        // a random ±1/√n direction over the whole tensor, and the largest-|g| coordinate
        const dir = Float64Array.from(p, () => (rng.uniform() < 0.5 ? -1 : 1) / Math.sqrt(p.length))
        let top = 0
        for (let i = 1; i < g.length; i++) if (Math.abs(g[i]) > Math.abs(g[top])) top = i
        const one = new Float64Array(p.length)
        one[top] = 1
        for (const [what, u] of [["random direction", dir], [`coord ${top}`, one]] as const) {
          const saved = Float64Array.from(p)
          for (let i = 0; i < p.length; i++) p[i] = saved[i] + eps * u[i]
          const lp = loss()
          for (let i = 0; i < p.length; i++) p[i] = saved[i] - eps * u[i]
          const lm = loss()
          p.set(saved)
          const fd = (lp - lm) / (2 * eps)
          let an = 0
          for (let i = 0; i < p.length; i++) an += g[i] * u[i]
          expect(Math.abs(fd), `${name} ${what}: the probe would be vacuous`).toBeGreaterThan(1e-3)
          if (Math.abs(an - fd) > 1e-4 * Math.abs(fd) + 1e-6) probes.push(`${name} ${what}: analytic ${an} vs finite-diff ${fd}`)
        }
      }
      expect(probes, probes.join("\n")).toEqual([])
    })

    it("rejects bad shapes and leaves no tensor behind", () => {
      const k = makeCase(6)
      run(lstmFinalState, k, MASK) // warm-up: backends may keep one-off state
      const before = tf.memory().numTensors
      run(lstmFinalState, k, MASK)
      run(lstmFinalState, k)
      expect(tf.memory().numTensors).toBe(before)
      tf.tidy(() => {
        const xz = tf.zeros([L, B, G]) as tf.Tensor3D
        expect(() => lstmFinalState(xz, tf.zeros([H + 1, G]) as tf.Tensor2D)).toThrow(/U must be \[H, 4H\]/)
        expect(() => lstmFinalState(tf.zeros([L, B, G + 1]) as tf.Tensor3D, tf.zeros([H, G]) as tf.Tensor2D)).toThrow(/xz must be/)
        expect(() => lstmFinalState(xz, tf.zeros([H, G]) as tf.Tensor2D, tf.zeros([B, L]) as tf.Tensor2D)).toThrow(/mask must be \[L, B\]/)
      })
    })
  })
}
