// Checks: a worker killed with SIGKILL while it holds a lease loses nothing. Over real
// NATS, every actor its own process, a small corpus (an epoch of ~25 batches), 2 workers
// and 2 parameter-server shards: the test SIGKILLs worker-b the moment the loader hands
// it a batch (it sees the lease request and its reply on the bus). Then the batch is
// re-issued (the loader says so) and leased to worker-a, the job finishes on worker-a
// alone, and on each shard every batch id of the first epoch is applied exactly once —
// the killed worker's batch included, from worker-a — and no id is ever applied twice.
// Run: npx vitest run test/dp.kill.test.ts   (~30-50 s on 2 cores)
import { writeFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { batchId } from "../actors/loader/plan.ts"
import { useCluster, type LeaseSeen } from "./support/cluster.ts"
import { drillCorpus } from "./support/drill-job.ts"

const STEPS = 35

/** ~1.6 kB of text: 100 windows of 16 tokens, 25 batches of 4 per epoch (the drills' corpus). */
const corpusText = drillCorpus

describe("a worker killed while holding a lease (separate processes over NATS)", () => {
  const suite = useCluster()


  it("re-issues its batch to the other worker; every batch of the epoch is applied exactly once per shard", async () => {
    const { cluster, obs } = await suite.start((dir) => {
      const corpus = join(dir, "corpus.txt")
      writeFileSync(corpus, corpusText())
      return {
        job: "dp-kill",
        model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
        data: { corpus, batchSize: 4, valFraction: 0, valBatches: 1 },
        train: { steps: STEPS, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 2_000, leaseTimeoutMs: 20_000 },
        schedule: { kind: "constant", lr: 3e-3 },
        topology: { workers: 2, psShards: 2 }
      }
    })
    const job = cluster.job
    const plan = makePlanForJob(job)
    expect(plan.batchesPerEpoch).toBe(25)
    const why = () => `\n(at version ${obs.version()})\n${cluster.logs()}`
    cluster.spawnServices()
    cluster.spawn("worker", "worker-a")
    const b = cluster.spawn("worker", "worker-b")
    await obs.until(() => obs.version() >= 3, 60_000, () => `version 3${why()}`)

    // ---- SIGKILL worker-b as soon as it is handed its next batch
    let held: LeaseSeen | undefined
    obs.onLease((l) => {
      if (held === undefined && l.worker === "worker-b") {
        held = l
        b.proc.kill("SIGKILL")
      }
    })
    await obs.until(() => held !== undefined, 20_000, () => `a lease to worker-b${why()}`)
    expect(await b.exited).toEqual({ code: null, signal: "SIGKILL" })
    const killed = held!.batchId
    expect(obs.leases.filter((l) => l.worker === "worker-b").pop()?.batchId, "worker-b's last lease").toBe(killed)

    // ---- the job finishes on worker-a alone
    await obs.until(() => obs.version() >= STEPS, 60_000, () => `the final version ${STEPS} after killing worker-b (it held ${killed})${why()}`)
    const loader = cluster.actors.find((p) => p.id === "loader-0")!
    const reissued = await loader.waitForLine(new RegExp(`re-issuing ${killed} \\(was leased to worker-b\\)`), 1_000)
    console.info(`[dp.kill] killed worker-b holding ${killed}; loader: ${reissued.replace(/^\S+ \S+\s+/, "")}`)
    const again = obs.leases.filter((l) => l.batchId === killed && l !== held)
    expect(again.map((l) => l.worker), `who leased ${killed} after the kill`).toEqual(["worker-a"])
    expect(again[0].attempt).toBe(held!.attempt + 1)

    // ---- exactly once, per shard
    const epoch0 = Array.from({ length: plan.batchesPerEpoch }, (_, i) => batchId(0, i))
    for (const k of [0, 1]) {
      const applied = obs.appliedOf(k)
      expect(applied.map((a) => a.version), `shard ${k} versions`).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1))
      const ids = applied.flatMap((a) => a.batchIds)
      const twice = ids.filter((id, i) => ids.indexOf(id) !== i)
      expect(twice, `shard ${k}: batch ids applied more than once`).toEqual([])
      for (const id of epoch0) expect(ids.filter((x) => x === id).length, `shard ${k}: ${id} applied once`).toBe(1)
      const withKilled = applied.filter((a) => a.batchIds.includes(killed))
      expect(withKilled.length).toBe(1)
      expect(withKilled[0].contributors[withKilled[0].batchIds.indexOf(killed)], `shard ${k}: who contributed ${killed}`).toBe("worker-a")
      // after the barrier dropped it, worker-b is in no version
      const lastWithB = Math.max(0, ...applied.filter((a) => a.contributors.includes("worker-b")).map((a) => a.version))
      for (const a of applied.filter((a) => a.version > lastWithB)) expect(a.contributors).toEqual(["worker-a"])
    }
    const [s0, s1] = [obs.appliedOf(0), obs.appliedOf(1)]
    for (let i = 0; i < STEPS; i++) expect(s1[i].batchIds, `version ${i + 1}: both shards applied the same batches`).toEqual(s0[i].batchIds)
    expect(await cluster.actors.find((p) => p.id === "worker-a")!.exited).toEqual({ code: 0, signal: null })
  })
})
