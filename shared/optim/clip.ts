// Implements: gradient hygiene before an optimizer step — the global L2 norm of a set of
// gradient tensors, clipping by that norm in place (torch.nn.utils.clip_grad_norm_
// semantics), and finding the first NaN/±Inf element.
// Does not own: what to do with a bad gradient (the parameter server rejects or skips
// it), the optimizers (shared/optim/optimizers.ts).
//
// Shapes: each gradient is a flat Float32Array of its tensor's N elements; norms are
// accumulated in float64 (no overflow: a float32² is < 1.2e77).

/** √(Σ over all tensors and elements of g²), accumulated in float64. NaN/Inf propagate. */
export const globalNorm = (grads: Iterable<Float32Array>): number => {
  let sum = 0
  for (const g of grads) {
    for (let i = 0; i < g.length; i++) {
      const x = g[i]
      sum += x * x
    }
  }
  return Math.sqrt(sum)
}

export interface ClipResult {
  /** the global norm before clipping */
  readonly norm: number
  /** the factor the gradients were multiplied by (1 when not clipped) */
  readonly scale: number
}

/**
 * Scale all gradients in place by maxNorm / (norm + 1e-6) when that is below 1, as
 * torch.nn.utils.clip_grad_norm_ (norm_type 2) does. maxNorm = Infinity never clips.
 * A non-finite norm leaves the gradients untouched (scale 1; torch would multiply them by
 * NaN): check `Number.isFinite(norm)` or use `findNonFinite` to reject them.
 */
export const clipByGlobalNorm = (grads: Iterable<Float32Array>, maxNorm: number): ClipResult => {
  if (!(maxNorm > 0)) throw new RangeError(`clipByGlobalNorm: maxNorm must be > 0, got ${maxNorm}`)
  const list = Array.isArray(grads) ? (grads as ReadonlyArray<Float32Array>) : [...grads]
  const norm = globalNorm(list)
  const scale = maxNorm / (norm + 1e-6)
  if (!Number.isFinite(norm) || !(scale < 1)) return { norm, scale: 1 }
  for (const g of list) {
    for (let i = 0; i < g.length; i++) g[i] *= scale
  }
  return { norm, scale }
}

export interface NonFinite {
  readonly name: string
  readonly index: number
  readonly value: number
}

/**
 * The first NaN or ±Inf element, in the map's iteration order, or undefined when all are
 * finite. Each tensor is scanned once without branching (x·0 is NaN only for non-finite x);
 * only a tensor that has one is scanned again for the index.
 */
export const findNonFinite = (grads: ReadonlyMap<string, Float32Array>): NonFinite | undefined => {
  for (const [name, g] of grads) {
    let acc = 0
    for (let i = 0; i < g.length; i++) acc += g[i] * 0
    if (acc === 0) continue
    for (let i = 0; i < g.length; i++) {
      if (!Number.isFinite(g[i])) return { name, index: i, value: g[i] }
    }
  }
  return undefined
}
