// Implements: the model contract the worker and the parameter server share, and the
// helpers that run one on plain Float32Arrays (loss, loss + gradients, sizes).
// Owns: ModelDef/ParamSpec and the tensor bookkeeping around a loss (create, tidy,
// read back, dispose). Does not own: any model's maths (gpt.ts, lstm-classifier.ts),
// the optimizer (parameter server), or backend choice (shared/compute/backend.ts).
//
// Parameters cross actors as Map<name, Float32Array> in `specs` order; a model's loss
// is a pure function of named tensors and a batch, so the same def serves the worker
// (gradients), the parameter server (init, shapes) and evaluation.

import * as tf from "@tensorflow/tfjs"

export interface ParamSpec {
  readonly name: string
  readonly shape: readonly number[]
}

export interface ModelDef<Batch> {
  readonly kind: string
  /** The resolved config (every default filled in), printed at start-up. */
  readonly config: unknown
  /** Fixed, deterministic order: the wire and checkpoint order of the parameters. */
  readonly specs: readonly ParamSpec[]
  /** Deterministic init from a seed (shared/models/rng.ts), one array per spec. */
  init(seed: number): Map<string, Float32Array>
  /** Mean loss over the batch; a pure function of the params (no state, no randomness). */
  loss(params: ReadonlyMap<string, tf.Tensor>, batch: Batch): tf.Scalar
}

export const sizeOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1)

export const countParams = (def: ModelDef<unknown>): number =>
  def.specs.reduce((n, s) => n + sizeOf(s.shape), 0)

/** Throws with the offending name when `params` does not match `def.specs`. */
export const checkParams = (def: ModelDef<unknown>, params: ReadonlyMap<string, Float32Array>): void => {
  for (const s of def.specs) {
    const v = params.get(s.name)
    if (v === undefined) throw new Error(`${def.kind}: missing parameter "${s.name}"`)
    if (v.length !== sizeOf(s.shape)) {
      throw new Error(`${def.kind}: parameter "${s.name}" has ${v.length} values, shape [${s.shape}] needs ${sizeOf(s.shape)}`)
    }
  }
}

/** Named float32 tensors for `params`, in spec order. Caller disposes (or runs in a tidy). */
export const toTensors = (
  def: ModelDef<unknown>,
  params: ReadonlyMap<string, Float32Array>
): Map<string, tf.Tensor> => {
  checkParams(def, params)
  const out = new Map<string, tf.Tensor>()
  for (const s of def.specs) out.set(s.name, tf.tensor(params.get(s.name)!, [...s.shape], "float32"))
  return out
}

/** A copy of a tensor's values that nothing else aliases (the cpu backend hands out its
 *  backing array; wasm's dataSync is already a copy of its heap). */
const readFloats = (t: tf.Tensor): Float32Array => {
  const v = t.dataSync() as Float32Array
  return tf.getBackend() === "wasm" ? v : new Float32Array(v)
}

/**
 * Loss and gradients of every parameter, as plain arrays. Leaves no tensor behind.
 * A parameter the loss does not reach gets a zero gradient.
 */
export const lossAndGrads = <B>(
  def: ModelDef<B>,
  params: ReadonlyMap<string, Float32Array>,
  batch: B
): { loss: number; grads: Map<string, Float32Array> } => {
  let loss = Number.NaN
  const grads = new Map<string, Float32Array>()
  tf.tidy(() => {
    const named = toTensors(def as ModelDef<unknown>, params)
    const xs = [...named.values()]
    // allowNoGradients: a null gradient becomes zeros below instead of an exception.
    const res = tf.engine().gradients(() => def.loss(named, batch), xs, undefined, true)
    loss = res.value.dataSync()[0]
    def.specs.forEach((s, i) => {
      const g = res.grads[i]
      grads.set(s.name, g == null ? new Float32Array(sizeOf(s.shape)) : readFloats(g))
    })
  })
  return { loss, grads }
}

/** The loss alone (no tape, no gradients). Leaves no tensor behind. */
export const evalLoss = <B>(def: ModelDef<B>, params: ReadonlyMap<string, Float32Array>, batch: B): number =>
  tf.tidy(() => def.loss(toTensors(def as ModelDef<unknown>, params), batch).dataSync()[0])
