// Implements: the in-process reference the equivalence tests and drills compare against —
// `relErr` (max |a − b| over max |b| of a tensor: relative to its scale) and `replay`: the
// versions a job's shards applied (StepApplied batch ids and LR), rebuilt with the loader's
// plan as one concatenated batch each and applied through the parameter server's own
// optimizer code (one ShardState holding every tensor) from the seeded init; `wire` stands
// for what the gradients go through on their way (a codec with error feedback).
// Does not own: running the job (cluster.ts, faults.ts).
import { makePlanForJob } from "../../actors/loader/loader.ts"
import { parseBatchId } from "../../actors/loader/plan.ts"
import { ShardState } from "../../actors/param-server/aggregate.ts"
import { initBackend } from "../../shared/compute/backend.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { concatBatches, lossAndGrads, type Batch } from "../../shared/models/model.ts"
import { makeModel, trainableNames } from "../../shared/models/zoo.ts"
import { resolveOptimizer } from "../../shared/optim/optimizers.ts"

/** max |a − b| / max |b| over a tensor. */
export const relErr = (a: Float32Array, b: Float32Array): number => {
  let d = 0
  let m = 0
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]))
    m = Math.max(m, Math.abs(b[i]))
  }
  return d / Math.max(m, 1e-12)
}

export interface AppliedVersion {
  readonly version: number
  readonly batchIds: readonly string[]
  readonly lr: number
}

/**
 * One in-process step per applied version on the concatenation of its batches; `check`
 * sees each version's whole batch and its loss (e.g. against the shards' reported loss).
 * Returns the reference's params and the model.
 */
export const replay = async (
  job: JobConfig,
  versions: readonly AppliedVersion[],
  check?: (v: AppliedVersion, whole: Batch, loss: number) => void,
  /** what the shards receive of a version's whole gradient (e.g. a codec's round trip with error feedback); default as is */
  wire?: (v: AppliedVersion, grads: Map<string, Float32Array>) => Map<string, Float32Array>
) => {
  await initBackend("wasm")
  const model = makeModel(job.model)
  const plan = makePlanForJob(job)
  const opt = resolveOptimizer(job.optimizer as never)
  if (opt._tag !== "Success") throw new Error("optimizer config")
  const trainable = new Set(trainableNames(job, model))
  const ref = new ShardState({ specs: model.specs, params: model.init(job.train.seed), optimizer: opt.success, consistency: { mode: "sync" }, clipNorm: 0, trainable })
  for (const a of versions) {
    const whole = concatBatches(a.batchIds.map((id) => {
      const p = parseBatchId(id)!
      return plan.trainBatch(p.epoch, p.index)
    }))
    const { loss, grads: computed } = lossAndGrads(model, ref.params, whole, trainable)
    check?.(a, whole, loss)
    const grads = wire ? wire(a, computed) : computed
    const ok = ref.admit({ sender: "reference", version: ref.version, batchId: `e99-b${a.version}`, samples: whole.size, tokens: model.units(whole).n, loss, grads })
    if (!ok.ok) throw new Error(`reference admit of version ${a.version}: ${ok.reason}`)
    ref.apply(a.lr, ref.choose(["reference"]))
  }
  return { model, params: ref.params }
}

/** The worst tensor of `got` against `want`, by relErr. */
export const worstTensor = (names: readonly string[], got: ReadonlyMap<string, Float32Array>, want: ReadonlyMap<string, Float32Array>) => {
  const errs = names.map((name) => ({ name, err: relErr(got.get(name)!, want.get(name)!) }))
  return { ...errs.reduce((w, e) => (e.err > w.err ? e : w)), all: errs }
}
