// Drill: 20 worker SIGKILLs in one run, each worker relaunched at once with the same id.
// 3 workers, 2 parameter-server shards. Every other kill of a worker lands exactly between
// its pushes to the two shards: the process was relaunched with the failpoint
// `worker.between-pushes` armed (shared/actor/failpoint.ts), so at its second push it dies
// after shard 0 has the gradient and before shard 1 gets any of it. The other kills come at
// a random moment (seeded) while it trains. The job completes, every planned batch is
// applied exactly once on both shards, params finite.
// Run: npx vitest run test/faults/worker.kill.test.ts   (~40-60 s on 2 cores)
import { describe, expect, it } from "vitest"
import { seeded, sleep, useDrill } from "../support/faults.ts"

const KILLS = 20
const SEED = 20240801

describe("20 worker SIGKILLs in one run", () => {
  const suite = useDrill()

  it("the job completes; every planned batch applied exactly once; params finite", async () => {
    const d = await suite.start({ job: "drill-worker-kill", workers: 3, psShards: 2, steps: 200, livenessMs: 2_000, leaseTimeoutMs: 4_000 })
    const rnd = seeded(SEED)
    d.startAll()
    await d.waitVersion(3, 60_000)
    const kinds: string[] = []
    // each victim is killed once its current process has pushed (it is in the job)
    const joined = (w: string) => {
      const p = d.nextPushFrame(w, undefined, 60_000)
      p.catch(() => {}) // awaited later; a timeout before then is reported there
      return p
    }
    const inJob = new Map<string, Promise<unknown>>(d.workerIds.map((w) => [w, joined(w)]))
    // which kills landed between the two shards' pushes (shard 0's frame seen, shard 1's not)
    const lastFrame = new Map<string, number>()
    d.onPushFrame((f) => void lastFrame.set(`${f.sender}/${f.shard}`, Date.now()))
    let between = 0
    const armed = new Set<string>()
    for (let i = 0; i < KILLS; i++) {
      expect(d.version(), `the job must still run at kill ${i + 1} (raise steps)`).toBeLessThan(d.job.train.steps)
      const w = d.workerIds[i % d.workerIds.length]
      await inJob.get(w)
      if (armed.has(w)) {
        // this process dies by itself at its second push, between shard 0 and shard 1
        const exit = await d.actor(w).exited
        expect(exit.signal, `${w} killed by its failpoint`).toBe("SIGKILL")
        if ((lastFrame.get(`${w}/0`) ?? 0) > (lastFrame.get(`${w}/1`) ?? 0)) between++
        kinds.push(`${w}@between`)
        armed.delete(w)
        await d.relaunch(w)
      } else {
        await sleep(Math.floor(rnd() * 800))
        kinds.push(`${w}@v${d.version()}`)
        // armed for its next kill, if it has one in this run
        const more = i + d.workerIds.length < KILLS
        await d.relaunch(w, more ? { FLOTILLA_FAILPOINT: "worker.between-pushes@2" } : {})
        if (more) armed.add(w)
      }
      inJob.set(w, joined(w))
    }
    expect(between, "kills that landed between the pushes to shard 0 and shard 1").toBe(kinds.filter((k) => k.endsWith("@between")).length)
    expect(between).toBeGreaterThanOrEqual(6)
    console.info(`[worker.kill] ${KILLS} kills by version ${d.version()} (${between} between its pushes to shards 0 and 1): ${kinds.join(" ")}`)
    await d.finish(90_000)
    const r = await d.verify()
    console.info(`[worker.kill] ${JSON.stringify(r)}`)
  }, 180_000)
})
