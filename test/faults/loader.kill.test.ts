// Drill: the loader SIGKILLed and relaunched (twice: once mid-epoch, once around an epoch
// boundary). 2 workers, 2 shards. The relaunched loader rebuilds its done set from the
// shards' applied logs; the job completes, every planned batch is applied exactly once
// (none twice, none skipped), params finite.
// Run: npx vitest run test/faults/loader.kill.test.ts   (~25-35 s on 2 cores)
import { describe, it } from "vitest"
import { useDrill } from "../support/faults.ts"

describe("loader SIGKILL and relaunch", () => {
  const suite = useDrill()

  it("the job completes; every planned batch applied exactly once; params finite", async () => {
    const d = await suite.start({ job: "drill-loader-kill", workers: 2, psShards: 2, steps: 60 })
    d.startAll()
    for (const at of [5, 12]) {
      await d.waitVersion(at, 60_000)
      const v = d.version()
      await d.relaunch("loader-0")
      console.info(`[loader.kill] relaunched the loader at version ${v}`)
      await d.waitVersion(v + 5, 60_000)
    }
    await d.finish(60_000)
    const r = await d.verify()
    console.info(`[loader.kill] ${JSON.stringify(r)}`)
  }, 150_000)
})
