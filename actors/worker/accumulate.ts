/**
 * Implements: gradient accumulation's arithmetic — k micro-batch gradients (each the
 * mean over its own samples) into the one gradient a worker pushes: the sample-weighted
 * mean of gradients and losses, summed in micro-batch order (float64), so it equals the
 * gradient of the k batches taken as one batch. The pushed batch id lists the
 * micro-batches (`e0-b1+e0-b7`); the parameter server records each as applied.
 * Does not own: leasing (worker.ts), the model's gradients (shared/models).
 */

export interface MicroBatchGrad {
  readonly batchId: string
  readonly samples: number
  readonly loss: number
  readonly grads: ReadonlyMap<string, Float32Array>
}

export interface Accumulated {
  readonly batchId: string
  readonly samples: number
  readonly loss: number
  readonly grads: Map<string, Float32Array>
}

/** Separator of micro-batch ids in an accumulated gradient's batch id. */
export const BATCH_ID_SEPARATOR = "+"

export const accumulateGrads = (parts: readonly MicroBatchGrad[]): Accumulated => {
  if (parts.length === 0) throw new RangeError("accumulateGrads: no micro-batches")
  const batchId = parts.map((p) => p.batchId).join(BATCH_ID_SEPARATOR)
  if (parts.length === 1) return { batchId, samples: parts[0].samples, loss: parts[0].loss, grads: new Map(parts[0].grads) }
  const samples = parts.reduce((n, p) => n + p.samples, 0)
  const grads = new Map<string, Float32Array>()
  for (const [name, first] of parts[0].grads) {
    const acc = new Float64Array(first.length)
    for (const p of parts) {
      const g = p.grads.get(name)
      if (!g || g.length !== first.length) throw new RangeError(`accumulateGrads: micro-batch ${p.batchId} has no matching gradient ${name}`)
      const w = p.samples / samples
      for (let i = 0; i < g.length; i++) acc[i] += w * g[i]
    }
    grads.set(name, Float32Array.from(acc))
  }
  const loss = parts.reduce((l, p) => l + (p.loss * p.samples) / samples, 0)
  return { batchId, samples, loss, grads }
}
