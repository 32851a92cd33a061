// Drill: stage workers of a pipeline SIGKILLed mid-step. One replica of 2 stages (2 PS
// shards, 2 micro-batches per step). Stage 1 is relaunched with the failpoint
// `stage.mid-step` armed, so it dies right after sending its first micro-batch's activation
// gradient of a step (stage 0 holds part of the step's backward, stage 1's gradients are
// lost); it is relaunched, and stage 0 runs the step again as a new attempt on the same
// batches and params. Then stage 1 and stage 0 are each SIGKILLed at a seeded random moment
// and relaunched, and then the nats-server is SIGKILLed and restarted. The job completes; every planned batch is applied exactly once on both
// shards; and the final params equal an uninterrupted run of the same batches: the test
// rebuilds every version's batches from the applied history and replays them in this
// process through the parameter server's own optimizer code (relative 1e-5; SGD with
// momentum, whose parameter difference is a gradient difference: Adam would amplify the
// float noise of another summation order, see test/pipeline.equivalence.test.ts).
// Run: npx vitest run test/faults/pipeline.kill.test.ts   (~40-70 s on 2 cores)
import { describe, expect, it } from "vitest"
import { seeded, sleep, useDrill } from "../support/faults.ts"
import { replay, worstTensor } from "../support/replay.ts"

const STEPS = 40
const SEED = 424242

describe("pipeline stage workers SIGKILLed mid-step", () => {
  const suite = useDrill()

  it("the step is retried, nothing is applied twice, and the params equal an uninterrupted run of the same batches", async () => {
    const d = await suite.start({
      job: "drill-pipe-kill", workers: 1, psShards: 2, stages: 2, microBatches: 2, steps: STEPS, livenessMs: 2_000, leaseTimeoutMs: 6_000,
      train: { clipNorm: 0 }, optimizer: { kind: "sgd", momentum: 0.9 }
    })
    expect(d.workerIds).toEqual(["w0", "w0-s1"])
    const rnd = seeded(SEED)
    d.startAll()
    await d.waitVersion(3, 60_000)
    // 1. stage 1 dies mid-step, by its failpoint (its 3rd step's first backward)
    await d.relaunch("w0-s1", { FLOTILLA_FAILPOINT: "stage.mid-step@3" })
    const exit = await d.actor("w0-s1").exited
    expect(exit.signal, `stage 1 killed by its failpoint${d.why()}`).toBe("SIGKILL")
    const at = d.version()
    await d.relaunch("w0-s1")
    await d.waitVersion(at + 2, 60_000)
    // 2. and 3. SIGKILLs at random moments: stage 1, then stage 0 (the replica's lease owner)
    for (const id of ["w0-s1", "w0"]) {
      await sleep(Math.floor(rnd() * 1_500))
      const v = d.version()
      await d.relaunch(id)
      await d.waitVersion(v + 2, 60_000)
    }
    // 4. the nats-server itself: SIGKILLed and restarted while the stages exchange activations
    {
      const v = d.version()
      expect(v, "the job must still run when nats-server dies (raise STEPS)").toBeLessThan(STEPS - 2)
      const server = d.nats.servers[0]
      await server.kill()
      await server.restart()
      await d.waitVersion(v + 2, 60_000)
    }
    await d.finish(90_000)
    const r = await d.verify()
    console.info(`[pipeline.kill] ${JSON.stringify(r)}`)
    expect(d.cluster.logs()).toMatch(/running it again as attempt 1/)

    // the uninterrupted run of the same batches, in this process
    const versions = Array.from({ length: STEPS }, (_, i) => {
      const a = d.obs.appliedOf(0).filter((x) => x.version === i + 1).at(-1)
      expect(a, `shard 0 reported version ${i + 1}`).toBeDefined()
      return a!
    })
    const { model, params: refParams } = await replay(d.job, versions)
    const got = await d.params()
    const worst = worstTensor(model.specs.map((s) => s.name), got, refParams)
    console.info(`[pipeline.kill] vs the uninterrupted replay: worst relative error ${worst.err.toExponential(2)} (${worst.name})`)
    expect(worst.err, `final params vs an uninterrupted run of the same batches (${worst.name})`).toBeLessThan(1e-5)
  }, 240_000)
})
