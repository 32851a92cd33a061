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
// The same check runs for the LSTM classifier (a tiny one on a small labelled jsonl corpus):
// its batches are tokens + labels, and half-batches of each stay aligned with their labels.
// Run: npx vitest run test/dp.equivalence.test.ts   (~60-90 s on 2 cores)
import { describe, expect, it } from "vitest"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { parseBatchId } from "../actors/loader/plan.ts"
import { concatBatches } from "../shared/models/model.ts"
import { writeFileSync } from "node:fs"
import { join } from "node:path"
import { mulberry32 as seeded } from "../actors/loader/plan.ts"
import { ShardState } from "../actors/param-server/aggregate.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { resolveOptimizer } from "../shared/optim/optimizers.ts"
import type { StepApplied } from "../shared/protocol/messages.ts"
import { useCluster } from "./support/cluster.ts"
import { relErr } from "./support/replay.ts"

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

/** Run JOB over NATS (2 workers, 2 shards) for STEPS versions and check it against one in-process step on the whole batch. */
const equivalence = async (suite: ReturnType<typeof useCluster>, patch: Record<string, any> | ((dir: string) => Record<string, any>)) => {
  const { cluster, obs } = await suite.start(patch)
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
    const whole = concatBatches(a.batchIds.map((id) => {
      const p = parseBatchId(id)!
      return plan.trainBatch(p.epoch, p.index)
    }))
    expect(whole.size).toBe(2 * HALF)
    const { loss, grads } = lossAndGrads(model, ref.params, whole)
    expect(Math.abs(loss - a.loss) / loss, `version ${a.version}: full-batch loss ${loss} vs sample-weighted mean ${a.loss}`).toBeLessThan(1e-5)
    const ok = ref.admit({ sender: "reference", version: ref.version, batchId: `e99-b${a.version}`, samples: 2 * HALF, tokens: model.units(whole).n, loss, grads })
    expect(ok.ok).toBe(true)
    ref.apply(a.lr, ref.choose(["reference"]))
  }

  const dp = new Map([...pulled[0].params, ...pulled[1].params])
  expect([...dp.keys()].sort()).toEqual(model.specs.map((s) => s.name).sort())
  const errs = model.specs.map((s) => ({ name: s.name, err: relErr(dp.get(s.name)!, ref.params.get(s.name)!) }))
  const worst = errs.reduce((w, e) => (e.err > w.err ? e : w))
  console.info(`[dp.equivalence] ${job.model.kind}: worst relative error ${worst.err.toExponential(2)} (${worst.name})`)
  expect(worst.err, `worst tensor ${worst.name}: relative error ${worst.err.toExponential(2)}; all: ${errs.map((e) => `${e.name} ${e.err.toExponential(1)}`).join(", ")}`).toBeLessThan(1e-5)
  // the params really moved (a test that compares two untouched inits proves nothing)
  const init = model.init(job.train.seed)
  expect(Math.max(...model.specs.map((s) => relErr(dp.get(s.name)!, init.get(s.name)!)))).toBeGreaterThan(1e-3)
}

/** A small labelled corpus (jsonl): the label is in the words, so a classifier has something to learn. */
const labelledCorpus = (dir: string): string => {
  const file = join(dir, "texts.jsonl")
  const rng = seeded(5)
  const words = ["win", "free", "prize", "money", "meeting", "lunch", "report", "thanks", "offer", "click", "team", "notes"]
  const lines = Array.from({ length: 64 }, (_, i) => {
    const spam = i % 3 === 0
    const n = 3 + Math.floor(rng() * 8)
    const text = Array.from({ length: n }, () => words[(spam ? 0 : 4) + Math.floor(rng() * 8)]).join(" ")
    return JSON.stringify({ text, label: spam ? "spam" : "ham" })
  })
  writeFileSync(file, lines.join("\n") + "\n")
  return file
}

describe("sync data parallel over NATS (2 worker processes, 2 PS shards)", () => {
  const suite = useCluster()

  it("gpt: equals one in-process step on the concatenated batch, for 3 steps", async () => {
    await equivalence(suite, JOB)
  })

  it("lstm classifier: equals one in-process step on the concatenated batch, for 3 steps", async () => {
    await equivalence(suite, (dir) => ({
      ...JOB,
      job: "dp-eqv-lstm",
      model: { kind: "lstm-classifier", vocabSize: 20, embedDim: 6, hidden: 5, dense: 4, maxLen: 8, maskPadding: true },
      data: { corpus: labelledCorpus(dir), batchSize: HALF, valFraction: 0.25, valBatches: 1, seed: 3 }
    }))
  })
})
