// Checks: sync data parallelism over real NATS, with every actor its own process (loader,
// scheduler, 2 parameter-server shards, 2 workers), is the same maths as one in-process
// step on the whole batch. Each worker trains on half of a batch of B (job batchSize =
// B/2); for each of 3 versions the test takes the batch ids the shards report
// (StepApplied), rebuilds their tokens with the loader's plan (actors/loader/plan.ts),
// computes loss and gradients on their concatenation (B sequences) in this process, and
// applies the parameter server's own optimizer code (ShardState, one shard holding every
// tensor). The sample-weighted mean of two equal halves is the full-batch mean, so the
// params pulled from the shards after version 3 must match to a relative 1e-5.
// clipNorm is 0: a sharded PS clips each shard by its own norm, not the global one.
// The optimizer is SGD with momentum and weight decay, which is linear in the gradient, so
// a parameter difference measures a gradient difference. Not Adam: it maps a gradient
// that is zero in exact arithmetic (the key bias of attention: softmax ignores it) but
// float32 noise (~1e-9) in both computations to ±lr, so two correct runs differ by up to
// 2·lr there (measured: 3e-4 relative on c_attn.bias, every other tensor < 2e-6).
// Run: npx vitest run test/dp.equivalence.test.ts   (~30-60 s on 2 cores)
import { describe, expect, it } from "vitest"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { parseBatchId, trainBatch } from "../actors/loader/plan.ts"
import { ShardState } from "../actors/param-server/aggregate.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { resolveOptimizer } from "../shared/optim/optimizers.ts"
import type { StepApplied } from "../shared/protocol/messages.ts"
import { useCluster } from "./support/cluster.ts"

const HALF = 2 // sequences per worker; the reference step sees B = 2 × HALF
const STEPS = 3

const JOB = {
  job: "dp-eqv",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: HALF, valBatches: 1 },
  train: { steps: STEPS, clipNorm: 0, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 15_000, leaseTimeoutMs: 30_000, seed: 7 },
  optimizer: { kind: "sgd", momentum: 0.9, weightDecay: 0.01 },
  schedule: { kind: "constant", lr: 0.1 },
  topology: { workers: 2, psShards: 2 }
}

/** max |a − b| / max |b| over a tensor: relative to the tensor's scale. */
const relErr = (a: Float32Array, b: Float32Array): number => {
  let d = 0
  let m = 0
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]))
    m = Math.max(m, Math.abs(b[i]))
  }
  return d / Math.max(m, 1e-12)
}

describe("sync data parallel over NATS (2 worker processes, 2 PS shards)", () => {
  const suite = useCluster()


  it("equals one in-process step on the concatenated batch, for 3 steps", async () => {
    const { cluster, obs } = await suite.start(JOB)
    const job = cluster.job
    cluster.spawnServices()
    cluster.spawn("worker", "worker-a")
    cluster.spawn("worker", "worker-b")
    await obs.until(() => obs.version() >= STEPS, 75_000, () => `version ${STEPS} on both shards (at ${obs.version()})\n${cluster.logs()}`)
    const pulled = [await obs.pull(0), await obs.pull(1)]
    expect(pulled.map((p) => p.version), `versions pulled; applied: ${JSON.stringify(obs.applied.map((a) => [a.shard, a.version, a.contributors]))}\n${cluster.logs()}`).toEqual([STEPS, STEPS])

    // ---- what the shards applied: the same batches, both workers, in every version
    const perVersion: StepApplied[][] = []
    for (let v = 1; v <= STEPS; v++) {
      const [a0, a1] = [0, 1].map((k) => obs.appliedOf(k).find((a) => a.version === v)!)
      expect(a0, `shard 0 reported version ${v}`).toBeDefined()
      expect(a1, `shard 1 reported version ${v}`).toBeDefined()
      expect(a1.batchIds).toEqual(a0.batchIds)
      expect(a1.contributors).toEqual(a0.contributors)
      expect(a0.contributors, `version ${v}: both workers contribute`).toEqual(["worker-a", "worker-b"])
      expect(a0.samples).toBe(2 * HALF)
      perVersion.push([a0, a1])
    }
    expect(obs.errors, "nothing rejected").toEqual([])

    // ---- the reference: one process, the whole batch, the PS's own optimizer code
    await initBackend("wasm")
    const model = makeModel(job.model)
    const plan = makePlanForJob(job)
    const opt = resolveOptimizer(job.optimizer as never)
    if (opt._tag !== "Success") throw new Error("optimizer config")
    const ref = new ShardState({
      specs: model.specs,
      params: model.init(job.train.seed),
      optimizer: opt.success,
      consistency: { mode: "sync" },
      clipNorm: 0
    })
    for (const [a] of perVersion) {
      const halves = a.batchIds.map((id) => {
        const p = parseBatchId(id)!
        return trainBatch(plan, p.epoch, p.index)
      })
      const tokens = new Int32Array(halves.reduce((n, h) => n + h.length, 0))
      let off = 0
      for (const h of halves) {
        tokens.set(h, off)
        off += h.length
      }
      const { loss, grads } = lossAndGrads(model, ref.params, { tokens, batchSize: 2 * HALF, seqLen: plan.T })
      expect(Math.abs(loss - a.loss) / loss, `version ${a.version}: full-batch loss ${loss} vs sample-weighted mean ${a.loss}`).toBeLessThan(1e-5)
      const ok = ref.admit({ sender: "reference", version: ref.version, batchId: `e99-b${a.version}`, samples: 2 * HALF, tokens: 2 * HALF * plan.T, loss, grads })
      expect(ok.ok).toBe(true)
      ref.apply(a.lr, ref.choose(["reference"]))
    }

    const dp = new Map([...pulled[0].params, ...pulled[1].params])
    expect([...dp.keys()].sort()).toEqual(model.specs.map((s) => s.name).sort())
    const errs = model.specs.map((s) => ({ name: s.name, err: relErr(dp.get(s.name)!, ref.params.get(s.name)!) }))
    const worst = errs.reduce((w, e) => (e.err > w.err ? e : w))
    console.info(`[dp.equivalence] worst relative error ${worst.err.toExponential(2)} (${worst.name})`)
    expect(worst.err, `worst tensor ${worst.name}: relative error ${worst.err.toExponential(2)}; all: ${errs.map((e) => `${e.name} ${e.err.toExponential(1)}`).join(", ")}`).toBeLessThan(1e-5)
    // the params really moved (a test that compares two untouched inits proves nothing)
    const init = model.init(job.train.seed)
    expect(Math.max(...model.specs.map((s) => relErr(dp.get(s.name)!, init.get(s.name)!)))).toBeGreaterThan(1e-3)
  })
})
