// Implements: gradient accumulation (train.accumulate = k) end to end — the averaged
// gradient of k micro-batches equals the gradient of the k batches as one batch (GPT,
// within float32 tolerance); the parameter server records each micro-batch id of an
// accumulated gradient as applied (and refuses any of them again); and a job with
// accumulate 3 over a real NATS server pushes one gradient per 3 leased batches, its
// StepApplied listing each, and the loader counts each done.
// Run: npx vitest run test/accumulate.test.ts
// Does not own: the control plane (test/control*.test.ts).
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import { ShardState } from "../actors/param-server/aggregate.ts"
import { accumulateGrads } from "../actors/worker/accumulate.ts"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { gptBatch } from "../shared/models/gpt.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { jobLayers, startJob, tinyJob, uniqueJob, waitUntil } from "./support/control-job.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

let nats: AcquiredNats
beforeAll(async () => {
  nats = await acquireNats()
})
afterAll(async () => {
  await nats?.stop()
})

describe("gradient accumulation", () => {
  it("the sample-weighted mean of micro-batch gradients is the gradient of the whole batch", async () => {
    await initBackend("cpu")
    const job = tinyJob("acc-math")
    const model = makeModel(job.model)
    const params = model.init(7)
    const plan = makePlanForJob(job)
    const T = plan.T
    // micro-batches of 4 and 2 sequences (unequal sizes: the weights matter), and both as one batch of 6
    const a = plan.trainBatch(0, 0).tensors.get("tokens") as Int32Array
    const b = (plan.trainBatch(0, 1).tensors.get("tokens") as Int32Array).subarray(0, 2 * (T + 1))
    const whole = new Int32Array(a.length + b.length)
    whole.set(a)
    whole.set(b, a.length)
    const ga = lossAndGrads(model, params, gptBatch(a, 4))
    const gb = lossAndGrads(model, params, gptBatch(b, 2))
    const ref = lossAndGrads(model, params, gptBatch(whole, 6))
    const acc = accumulateGrads([
      { batchId: "e0-b0", samples: 4, ...ga },
      { batchId: "e0-b1", samples: 2, ...gb }
    ])
    expect(acc.batchId).toBe("e0-b0+e0-b1")
    expect(acc.samples).toBe(6)
    expect(acc.loss).toBeCloseTo(ref.loss, 5)
    for (const [name, g] of ref.grads) {
      const got = acc.grads.get(name)!
      let err = 0
      let scale = 0
      for (let i = 0; i < g.length; i++) {
        err = Math.max(err, Math.abs(got[i] - g[i]))
        scale = Math.max(scale, Math.abs(g[i]))
      }
      expect(err, `${name}: max |Δ| ${err} vs max |g| ${scale}`).toBeLessThanOrEqual(1e-5 * Math.max(1, scale))
    }
  })

  it("the parameter server records each micro-batch of an accumulated gradient as applied", () => {
    const specs = [{ name: "w", shape: [3] }]
    const state = new ShardState({
      specs, params: new Map([["w", Float32Array.of(1, 2, 3)]]), optimizer: { kind: "sgd", momentum: 0, dampening: 0, nesterov: false, weightDecay: 0 },
      consistency: { mode: "sync" }, clipNorm: 0
    })
    const grads = new Map([["w", Float32Array.of(1, 1, 1)]])
    expect(state.admit({ sender: "w0", version: 0, batchId: "e0-b1+e0-b7", samples: 8, tokens: 64, loss: 2, grads }).ok).toBe(true)
    const { step } = state.apply(0.5, state.choose(["w0"]))
    expect(step.batchIds).toEqual(["e0-b1", "e0-b7"])
    expect(step.samples).toBe(8)
    expect([...state.params.get("w")!]).toEqual([0.5, 1.5, 2.5])
    expect(state.isApplied("e0-b1") && state.isApplied("e0-b7")).toBe(true)
    // a micro-batch again is never applied twice: inside another accumulation it is refused
    // as a duplicate; alone (every id already applied) it is acknowledged as applied, as a
    // resend of a push whose acknowledgement was lost must be
    const dup = state.admit({ sender: "w0", version: 1, batchId: "e0-b2+e0-b1", samples: 4, tokens: 32, loss: 2, grads })
    expect(dup.ok).toBe(false)
    if (!dup.ok) expect(dup.code).toBe("duplicate")
    expect(state.admit({ sender: "w0", version: 1, batchId: "e0-b7", samples: 4, tokens: 32, loss: 2, grads })).toEqual({ ok: true, staleness: 0, already: "applied" })
    expect(state.heldCount).toBe(0)
  })

  it.live("a worker with accumulate 3 pushes one gradient per 3 batches; StepApplied lists each", () =>
    Effect.gen(function* () {
      const job = tinyJob(uniqueJob("acc-run"), { train: { steps: 8, accumulate: 3 } })
      expect(job.train.accumulate).toBe(3)
      const run = yield* startJob(job)
      yield* waitUntil("the last step", () => run.version() >= 8, 60_000)
      for (const a of run.applied) {
        expect(a.batchIds, `version ${a.version}`).toHaveLength(3)
        expect(a.samples).toBe(3 * job.data.batchSize)
        expect(a.tokens).toBe(3 * job.data.batchSize * 16) // contextLength 16
      }
      const ids = run.applied.flatMap((a) => a.batchIds)
      expect(new Set(ids).size).toBe(ids.length) // no micro-batch twice
      for (const id of ids) expect(id).toMatch(/^e\d+-b\d+$/)
      yield* waitUntil("the loader to count them done", () => run.loader.status().done === ids.length, 5_000)
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 90_000)
})
