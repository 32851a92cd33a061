// Drill: 20 worker SIGKILLs in one run, each relaunched at once with the same id. 2 workers,
// 2 parameter-server shards; the victims take turns; half the kills land between a
// worker's pushes to the two shards (the moment its first frame shows on ps.0.push, with
// max_payload small enough that a push is several frames), the
// others at a random moment (seeded) while it trains. The job completes, every planned
// batch is applied exactly once on both shards, params finite.
// Run: npx vitest run test/faults/worker.kill.test.ts   (~35-50 s on 2 cores)
import { describe, expect, it } from "vitest"
import { seeded, sleep, useDrill } from "../support/faults.ts"

const KILLS = 20
const SEED = 20240801

describe("20 worker SIGKILLs in one run", () => {
  // 20 KiB max_payload: each push is several frames, so a kill on its first frame to shard 0
  // lands mid-push, before shard 1 has it all
  const suite = useDrill({ maxPayload: 20 * 1024 })

  it("the job completes; every planned batch applied exactly once; params finite", async () => {
    const d = await suite.start({ job: "drill-worker-kill", workers: 2, psShards: 2, steps: 200, livenessMs: 2_000, leaseTimeoutMs: 4_000 })
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
    for (let i = 0; i < KILLS; i++) {
      expect(d.version(), `the job must still run at kill ${i + 1} (raise steps)`).toBeLessThan(d.job.train.steps)
      const w = d.workerIds[i % d.workerIds.length]
      await inJob.get(w)
      if (i % 4 < 2) {
        const f0 = Date.now()
        await d.nextPushFrame(w, 0, 30_000) // its push to shard 0 has started; shard 1's maybe not yet
        await d.relaunch(w)
        if ((lastFrame.get(`${w}/1`) ?? 0) < f0) between++
        kinds.push(`${w}@push`)
        inJob.set(w, joined(w))
        continue
      } else {
        await sleep(Math.floor(rnd() * 800))
        kinds.push(`${w}@v${d.version()}`)
      }
      await d.relaunch(w)
      inJob.set(w, joined(w))
    }
    console.info(`[worker.kill] ${KILLS} kills by version ${d.version()} (${between} between its pushes to shards 0 and 1): ${kinds.join(" ")}`)
    await d.finish(90_000)
    const r = await d.verify()
    console.info(`[worker.kill] ${JSON.stringify(r)}`)
  }, 180_000)
})
