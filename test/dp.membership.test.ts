// Checks: membership of a sync data-parallel job comes from heartbeats, over real NATS with
// every actor its own process.
//   join:  a worker started while the job runs is in the barrier from the next version on
//          (it appears in StepApplied.contributors within a few versions of its first
//          heartbeat, and in every version after that while it lives);
//   leave: a worker stopped with SIGTERM says `leaving` on its way out, exits 0, and the
//          shards drop it from the barrier at once: versions keep advancing without it,
//          the first one well before livenessMs (10 s here) of silence could have dropped it.
// Run: npx vitest run test/dp.membership.test.ts   (~40-60 s on 2 cores)
import { describe, expect, it } from "vitest"
import type { StepApplied } from "../shared/protocol/messages.ts"
import { useCluster } from "./support/cluster.ts"

const LIVENESS_MS = 10_000

const JOB = {
  job: "dp-members",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 4, valBatches: 1 },
  // far more steps than the test runs: it stops the job itself
  train: { steps: 1_000_000, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 200, livenessMs: LIVENESS_MS, leaseTimeoutMs: 3_000 },
  schedule: { kind: "constant", lr: 3e-3 },
  // minWorkers = 1: the job starts with one worker
  topology: { workers: 1, psShards: 2 }
}

const has = (a: StepApplied, id: string) => a.contributors.includes(id)

describe("membership over NATS: workers join and leave a running job", () => {
  const suite = useCluster()


  it("a joining worker is used from the next version; a SIGTERMed one is dropped at once", async () => {
    const t0 = Date.now()
    const phase = (what: string) => console.info(`[dp.membership] ${((Date.now() - t0) / 1000).toFixed(1)} s: ${what} (version ${obs.version()})`)
    const { cluster, obs } = await suite.start(JOB)
    const why = () => `\n(at version ${obs.version()})\n${cluster.logs()}`
    cluster.spawnServices()
    cluster.spawn("worker", "worker-a")
    await obs.until(() => obs.version() >= 5, 60_000, () => `version 5 with one worker${why()}`)
    for (const a of obs.applied) expect(a.contributors).toEqual(["worker-a"])

    phase("5 versions with worker-a")
    // ---- join
    const b = cluster.spawn("worker", "worker-b")
    await obs.until(() => obs.members.has("worker-b"), 60_000, () => `worker-b's first heartbeat${why()}`)
    phase("worker-b joined")
    const joinedAt = obs.members.get("worker-b")!.firstAt
    const vJoin = [0, 1].map((k) => Math.max(0, ...obs.appliedOf(k).filter((a) => a.at <= joinedAt).map((a) => a.version)))
    await obs.until(
      () => [0, 1].every((k) => obs.appliedOf(k).filter((a) => has(a, "worker-b")).length >= 5),
      60_000,
      () => `5 versions with worker-b's gradients (joined at versions ${vJoin})${why()}`
    )
    for (const k of [0, 1]) {
      const applied = obs.appliedOf(k)
      const firstWithB = applied.find((a) => has(a, "worker-b"))!.version
      // the barrier of the version after the join includes it: it is in that one's
      // successor at the latest (+1 for the observer's and the shard's clocks)
      expect(firstWithB, `shard ${k}: worker-b joined at version ${vJoin[k]}, first contributed to ${firstWithB}`).toBeLessThanOrEqual(vJoin[k] + 3)
      for (const a of applied.filter((a) => a.version >= vJoin[k] + 3)) {
        expect(a.contributors, `shard ${k} version ${a.version}`).toEqual(["worker-a", "worker-b"])
      }
    }

    phase("worker-b contributed 5 times")
    // ---- leave (SIGTERM): a clean exit with a `leaving` heartbeat
    const termAt = Date.now()
    const exit = await b.term()
    expect(exit).toEqual({ code: 0, signal: null })
    expect(obs.members.get("worker-b")?.leavingAt, "worker-b's leaving heartbeat").toBeDefined()
    const leftAt = obs.members.get("worker-b")!.leavingAt!
    await obs.until(
      () => [0, 1].every((k) => obs.appliedOf(k).filter((a) => a.at > leftAt && !has(a, "worker-b")).length >= 5),
      30_000,
      () => `5 versions without worker-b after it left${why()}`
    )
    for (const k of [0, 1]) {
      const after = obs.appliedOf(k).filter((a) => a.at > termAt)
      const firstWithout = after.find((a) => !has(a, "worker-b"))!
      // without the leaving heartbeat the barrier would wait LIVENESS_MS for it
      expect(firstWithout.at - termAt, `shard ${k}: first version without worker-b came ${firstWithout.at - termAt} ms after SIGTERM`).toBeLessThan(LIVENESS_MS / 2)
      // a gradient it pushed before leaving may still be applied, in one version at most
      expect(obs.appliedOf(k).filter((a) => a.at > leftAt && has(a, "worker-b")).length).toBeLessThanOrEqual(1)
      const ps = cluster.actors.find((p) => p.id === `ps-${k}`)!
      await ps.waitForLine(/worker worker-b left \(left cleanly\)/, 5_000)
      expect(ps.lines.some((l) => /worker worker-b left \(silent/.test(l))).toBe(false)
    }

    phase(`worker-b left; rejections: ${JSON.stringify(obs.errors.map((e) => [e.code, e.sender, e.reason]))}`)
    // ---- throughout: the shards agree, and no batch was applied twice
    const [s0, s1] = [obs.appliedOf(0), obs.appliedOf(1)]
    const upTo = Math.min(s0.length, s1.length)
    for (let i = 0; i < upTo; i++) expect(s1[i].batchIds, `version ${s0[i].version}`).toEqual(s0[i].batchIds)
    for (const s of [s0, s1]) {
      const ids = s.flatMap((a) => a.batchIds)
      expect(new Set(ids).size, "no batch applied twice").toBe(ids.length)
    }
  })
})
