// Drill: the nats-server is restarted 3 times during one run (SIGTERM, SIGKILL, SIGTERM;
// each time started again on the same port; every actor loses its connection each time, and with it whatever was
// in flight). 2 workers, 2 parameter-server shards. The job completes, every planned batch
// is applied exactly once (the observer is disconnected too, so the applied logs are the
// authority for the versions it missed), params finite.
// Run: npx vitest run test/faults/nats.restart.test.ts   (~25-35 s on 2 cores)
import { describe, it } from "vitest"
import { useDrill } from "../support/faults.ts"

describe("nats-server restarted 3 times in one run", () => {
  const suite = useDrill()

  it("the job completes; every planned batch applied exactly once; params finite", async () => {
    const d = await suite.start({ job: "drill-nats-restart", workers: 2, psShards: 2, steps: 120 })
    d.startAll()
    const server = d.nats.servers[0]
    for (const [i, at] of [10, 40, 70].entries()) {
      await d.waitVersion(at, 60_000)
      const v = d.version()
      // the second time a crash: SIGKILL, then start it again
      if (i === 1) await server.kill()
      await server.restart()
      console.info(`[nats.restart] ${i === 1 ? "SIGKILLed and restarted" : "restarted"} nats-server at version ${v}`)
      await d.waitVersion(v + 10, 30_000)
    }
    await d.finish(60_000)
    const r = await d.verify({ allowGaps: true })
    console.info(`[nats.restart] ${JSON.stringify(r)}`)
  }, 150_000)
})
