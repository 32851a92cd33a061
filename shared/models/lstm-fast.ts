// Implements: the LSTM recurrence (final hidden state over precomputed input projections)
// as one differentiable op, `lstmFinalState`, with a hand-written backward pass (BPTT).
// Owns: the recurrence's forward and backward maths and their speed. Does not own: the
// embedding, the input projection x·W + b, the layers after the LSTM, or parameter
// names/init (lstm-classifier.ts), nor the kernels (shared/compute/kernels.ts).
//
// Shapes: L steps, B batch rows, H units, G = 4H gate pre-activations in Keras' block
// order [i, f, g, o].
//
// Why it is written this way (measured on the wasm backend, B=32, L=100, H=64):
//   - Spelled out as ~20 small tfjs ops a step (lstmLogits in lstm-classifier.ts), the
//     recurrence costs ~160-190 ms forward + backward, nearly all of it per-op overhead
//     (each op ~15-50 us of dispatch, tape bookkeeping and broadcasting for a [32, 64]
//     tensor; ~10,000 kernel calls a training step) and the tape's backward, which adds
//     ~2-3 ops per forward op. The matMuls themselves are ~37 us a step each way.
//   - Here each step is 3 tfjs ops forward (matMul, add, one sigmoid over all four gate
//     blocks) and 1 backward (matMul), read back with one dataSync (~20 us on wasm); the
//     rest of the cell is plain JS on Float32Arrays. Forward ~9 ms + backward ~11 ms
//     (bench/lstm.ts: a whole classifier step went from ~120-160 ms to ~48 ms).
//   - g = tanh(z_g) is taken from the same sigmoid: with u = 2σ(z) - 1 = tanh(z/2),
//     tanh(z) = 2u / (1 + u²). Only tanh(c) is computed in JS, by a rational approximation
//     (~4 ns; Math.tanh ~20-30 ns). Doing all five gate nonlinearities with Math.exp in JS
//     cost ~120 us a step, more than the three tfjs ops.
//   - Backward keeps the activations from the forward (i, f, g, o, tanh c, c, h per
//     step), so it does no transcendental math. dU = Σ_t h_{t-1}ᵀ dz_t is ONE plain
//     matMul over all steps after the loop (n = steps with any real token), instead of
//     a matMul and an add per step; the per-step matMul dz_t · Uᵀ uses an explicitly
//     transposed U (plain matMul: transposed-operand forms are 10x slower on wasm,
//     PERF-NOTES.md).
//   - A step where every row is padding is skipped outright (state unchanged, zero
//     gradient), forward and backward.
// Only public tfjs ops, so any backend runs it (tested on wasm and cpu; only wasm timed).
// Precision: the JS cell math is done in float64 from float32 inputs and stored as
// float32; outputs and gradients agree with the plain-op version to ~1e-6 of their
// largest magnitude (test/lstm-fast.test.ts checks 1e-5).

import * as tf from "@tensorflow/tfjs"

/** tanh as Eigen's (and XNNPACK's) float32 rational approximation, evaluated in float64:
 *  |error| < 2.6e-8 for |x| < 7.9 (where it clamps; tanh(7.9) = 1 - 2.7e-7), i.e. within
 *  float32 rounding. ~4 ns against ~20-30 ns for Math.tanh or an exp-based form, and the
 *  forward does B·H of them a step. */
const tanh = (a: number): number => {
  const x = a > 7.90531110763549805 ? 7.90531110763549805 : a < -7.90531110763549805 ? -7.90531110763549805 : a
  const x2 = x * x
  const p =
    x *
    (4.89352455891786e-3 +
      x2 * (6.37261928875436e-4 + x2 * (1.48572235717979e-5 + x2 * (5.12229709037114e-8 + x2 * (-8.60467152213735e-11 + x2 * (2.00018790482477e-13 + x2 * -2.76076847742355e-16))))))
  const q = 4.89352518554385e-3 + x2 * (2.268434632439e-3 + x2 * (1.18534705686654e-4 + x2 * 1.19825839466702e-6))
  return p / q
}

/**
 * One forward step's cell update for all B rows, in place.
 * act[a ..]: [B, G] sigmoid(z) on entry, the gates [i, f, g, o] on exit.
 * c/h[p ..]: state before the step ([B, H]), c/h[p + B·H ..]: state after.
 * tc[q ..]: tanh of the new cell, [B, H]. m[mo + b]: row b's mask (1 without a mask).
 */
const cellForward = (
  act: Float32Array, a: number,
  c: Float32Array, h: Float32Array, p: number,
  tc: Float32Array, q: number,
  m: Float32Array | undefined, mo: number,
  B: number, H: number
): void => {
  const G = 4 * H
  const n = p + B * H
  for (let b = 0; b < B; b++) {
    const mb = m === undefined ? 1 : m[mo + b]
    const o = a + b * G
    const r = b * H
    for (let j = 0; j < H; j++) {
      const ig = act[o + j]
      const fg = act[o + H + j]
      const u = 2 * act[o + 2 * H + j] - 1 // tanh(z_g / 2)
      const gg = (2 * u) / (1 + u * u) // tanh(z_g)
      const og = act[o + 3 * H + j]
      act[o + 2 * H + j] = gg
      const cp = c[p + r + j]
      const hp = h[p + r + j]
      const cn = fg * cp + ig * gg
      const t = tanh(cn)
      tc[q + r + j] = t
      // m = 1 on real tokens, 0 on padding: state' = state + m·(new - state)
      c[n + r + j] = cp + mb * (cn - cp)
      h[n + r + j] = hp + mb * (og * t - hp)
    }
  }
}

/**
 * One backward step for all B rows. On entry dh/dc: [B, H] gradients of the state after
 * the step; on exit, of the state before it, except the recurrent term dz·Uᵀ, which the
 * caller adds to dh. Writes dz ([B, G], pre-activation gradients) at dz[d ..].
 */
const cellBackward = (
  act: Float32Array, a: number,
  c: Float32Array, p: number,
  tc: Float32Array, q: number,
  m: Float32Array | undefined, mo: number,
  dh: Float64Array, dc: Float64Array,
  dz: Float32Array, d: number,
  B: number, H: number
): void => {
  const G = 4 * H
  for (let b = 0; b < B; b++) {
    const mb = m === undefined ? 1 : m[mo + b]
    const o = a + b * G
    const od = d + b * G
    const r = b * H
    for (let j = 0; j < H; j++) {
      const k = r + j
      const ig = act[o + j]
      const fg = act[o + H + j]
      const gg = act[o + 2 * H + j]
      const og = act[o + 3 * H + j]
      const t = tc[q + k]
      const dhn = mb * dh[k] // into the new h
      const dcn = mb * dc[k] + dhn * og * (1 - t * t) // into the new c
      dz[od + j] = dcn * gg * ig * (1 - ig)
      dz[od + H + j] = dcn * c[p + k] * fg * (1 - fg)
      dz[od + 2 * H + j] = dcn * ig * (1 - gg * gg)
      dz[od + 3 * H + j] = dhn * t * og * (1 - og)
      dc[k] = dc[k] - mb * dc[k] + dcn * fg
      dh[k] = dh[k] - dhn
    }
  }
}

/** Final hidden state h_L [B, H] of an LSTM over precomputed input projections.
 *  xz: [L, B, 4H] time-major (x_t·W + b, gate blocks [i, f, g, o], Keras order); U: [H, 4H];
 *  mask: optional [L, B] float32 (1 = real token, 0 = padding: the step leaves h and c unchanged).
 *  Differentiable w.r.t. xz and U (the gradients must equal the plain-op version's). */
export const lstmFinalState = (xz: tf.Tensor3D, U: tf.Tensor2D, mask?: tf.Tensor2D): tf.Tensor2D => {
  if (xz.rank !== 3 || xz.shape[2] % 4 !== 0) throw new Error(`lstmFinalState: xz must be [L, B, 4H], got [${xz.shape}]`)
  const [L, B, G] = xz.shape
  const H = G / 4
  if (U.rank !== 2 || U.shape[0] !== H || U.shape[1] !== G) {
    throw new Error(`lstmFinalState: U must be [H, 4H] = [${H}, ${G}], got [${U.shape}]`)
  }
  if (mask !== undefined && (mask.rank !== 2 || mask.shape[0] !== L || mask.shape[1] !== B)) {
    throw new Error(`lstmFinalState: mask must be [L, B] = [${L}, ${B}], got [${mask.shape}]`)
  }
  const M = mask === undefined ? undefined : Float32Array.from(mask.dataSync()) // [L, B]
  const BH = B * H
  const BG = B * G
  // Steps with at least one real token, in time order; the others change nothing.
  const active: number[] = []
  for (let t = 0; t < L; t++) {
    let any = M === undefined
    for (let b = 0; !any && b < B; b++) any = M![t * B + b] !== 0
    if (any) active.push(t)
  }

  const run = tf.customGrad((xzIn, uIn) => {
    const X = xzIn as tf.Tensor3D
    const Ut = uIn as tf.Tensor2D
    const n = active.length
    const act = new Float32Array(n * BG) // gates [i, f, g, o] of active step s
    const tc = new Float32Array(n * BH) // tanh(c_new) of active step s
    const c = new Float32Array((L + 1) * BH) // c_t after step t-1 (c_0 = 0)
    const h = new Float32Array((L + 1) * BH) // h_t after step t-1 (h_0 = 0)
    const steps = tf.unstack(X) as tf.Tensor2D[] // L x [B, G]
    let last = 0 // state slots filled so far: h[last] is the current state
    active.forEach((t, s) => {
      // Padding steps before t left the state as it was: carry it to slot t.
      for (; last < t; last++) {
        h.copyWithin((last + 1) * BH, last * BH, (last + 1) * BH)
        c.copyWithin((last + 1) * BH, last * BH, (last + 1) * BH)
      }
      const p = t * BH
      let sig: tf.Tensor
      if (s === 0) {
        sig = tf.sigmoid(steps[t]) // h = 0: z = xz_t
      } else {
        const hT = tf.tensor2d(h.subarray(p, p + BH), [B, H])
        const hu = tf.matMul(hT, Ut) // [B, G], plain 2-D: XNNPACK's fast path
        const z = tf.add(steps[t], hu)
        sig = tf.sigmoid(z)
        hT.dispose()
        hu.dispose()
        z.dispose()
      }
      act.set(sig.dataSync() as Float32Array, s * BG)
      sig.dispose()
      cellForward(act, s * BG, c, h, p, tc, s * BH, M, t * B, B, H)
      last = t + 1
    })
    for (const st of steps) st.dispose()
    const hL = h.slice(last * BH, (last + 1) * BH) // later padding steps change nothing

    const gradFunc = (dy: tf.Tensor): tf.Tensor[] => {
      const dh = Float64Array.from(dy.dataSync()) // [B, H]
      const dc = new Float64Array(BH)
      const dzc = new Float32Array(n * BG) // dz of active step s, contiguous: [n·B, G]
      const uT = tf.transpose(Ut) as tf.Tensor2D // [G, H], once: then plain matMuls
      for (let s = n - 1; s >= 0; s--) {
        const t = active[s]
        cellBackward(act, s * BG, c, t * BH, tc, s * BH, M, t * B, dh, dc, dzc, s * BG, B, H)
        if (s === 0) break // h before the first real step is the constant 0
        const dzT = tf.tensor2d(dzc.subarray(s * BG, (s + 1) * BG), [B, G])
        const dhr = tf.matMul(dzT, uT) // [B, H]: dz_t · Uᵀ
        const v = dhr.dataSync()
        for (let k = 0; k < BH; k++) dh[k] += v[k]
        dzT.dispose()
        dhr.dispose()
      }
      uT.dispose()
      // dU = Σ_s h_{t_s}ᵀ dz_s, one plain matMul over all active steps, taken as
      // dUᵀ = dzᵀ [G, n·B] × h [n·B, H]: XNNPACK packs its second operand on every call
      // with a new tensor, and h is 4x smaller than dz (measured ~1.5 ms less a step
      // than hᵀ × dz, the two transposes included).
      const nb = n * B
      if (nb === 0) return [tf.zerosLike(X), tf.zerosLike(Ut)] // all padding: nothing moved
      let hPrev = h.subarray(0, nb * H) // [n·B, H]: the state before each active step
      if (n < L) {
        hPrev = new Float32Array(nb * H)
        active.forEach((t, s) => hPrev.set(h.subarray(t * BH, (t + 1) * BH), s * BH))
      }
      const dzT = new Float32Array(G * nb) // [G, n·B], transposed in blocks of 16 rows
      for (let r0 = 0; r0 < nb; r0 += 16) {
        const r1 = Math.min(nb, r0 + 16)
        for (let g = 0; g < G; g++) {
          const dst = g * nb
          for (let r = r0; r < r1; r++) dzT[dst + r] = dzc[r * G + g]
        }
      }
      const dzm = tf.tensor2d(dzT, [G, nb])
      const hm = tf.tensor2d(hPrev, [nb, H])
      const dUT = tf.matMul(dzm, hm) // [G, H]
      const dU = tf.transpose(dUT) // [H, G]
      dzm.dispose()
      hm.dispose()
      dUT.dispose()
      // dxz: dz at the active steps, 0 at all-padding ones.
      let dxz = dzc
      if (n < L) {
        dxz = new Float32Array(L * BG)
        active.forEach((t, s) => dxz.set(dzc.subarray(s * BG, (s + 1) * BG), t * BG))
      }
      return [tf.tensor3d(dxz, [L, B, G]), dU]
    }
    return { value: tf.tensor2d(hL, [B, H]), gradFunc }
  })
  return run(xz, U) as tf.Tensor2D
}
