// Drill: a parameter server SIGKILLed and relaunched (same id and shard, resuming from its
// newest checkpoint) 5 times in one run, the two shards in turn. 2 workers, 2 shards,
// checkpointEvery 5. Each time the job gets past the kill point again before the next
// kill. The job completes; judged on the surviving history (versions after a checkpoint
// are recomputed), every planned batch is applied exactly once; params finite.
// Run: npx vitest run test/faults/ps.kill.test.ts   (~35-50 s on 2 cores)
import { describe, expect, it } from "vitest"
import { useDrill } from "../support/faults.ts"

describe("parameter-server SIGKILL and relaunch, 5 times", () => {
  const suite = useDrill()

  it("the job completes; every planned batch applied exactly once; params finite", async () => {
    const d = await suite.start({ job: "drill-ps-kill", workers: 2, psShards: 2, steps: 100, checkpointEvery: 5 })
    d.startAll()
    const kills: string[] = []
    for (let i = 0; i < 5; i++) {
      await d.waitVersion(8 + 15 * i, 60_000)
      const id = `ps-${i % 2}`
      const v = d.version()
      await d.relaunch(id)
      kills.push(`${id}@v${v}`)
      // back in business: past the kill point again (after its rollback and catch-up)
      await d.waitVersion(v + 3, 60_000)
    }
    console.info(`[ps.kill] kills: ${kills.join(" ")}`)
    await d.finish(60_000)
    const r = await d.verify()
    console.info(`[ps.kill] ${JSON.stringify(r)}`)
    // each kill costs one new incarnation per shard (the relaunched one, and its peer's one
    // rollback to the same checkpoint); more is a shard rolling back with nobody restarted
    expect(r.incarnations.length, "incarnations that applied a version: 2 at the start, 2 per kill").toBeLessThanOrEqual(2 + 2 * kills.length)
  }, 240_000)
})
