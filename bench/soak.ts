// The long fault soak (the CI drills in test/faults/ are its short form): a tiny job with
// 3 workers and 2 parameter-server shards runs for --minutes while, every --every seconds
// (seeded), one of them dies: a worker, a parameter server or the loader is SIGKILLed and
// relaunched with the same id (a server resumes from its checkpoint), or nats-server is
// restarted. At the end it checks what the drills check — the job moves on once the faults stop,
// no batch was applied twice on the surviving history of each shard (the StepApplied of
// each version's newest incarnation), both shards applied the same batches, params finite —
// and prints a table of the faults and the result. Bounded in time (--minutes, then the
// job is stopped) and in traffic (loopback only).
//   node bench/soak.ts [--minutes 10] [--every 4] [--seed 1]
// Owns nothing but the soak.
import { parseArgs } from "node:util"
import { Effect } from "effect"
import { ParamServerClient } from "../actors/param-server/protocol.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { makeCluster, observe } from "../test/support/cluster.ts"
import { drillPatch } from "../test/support/drill-job.ts"
import { seeded, survivingChain } from "../test/support/faults.ts"

const { values: v } = parseArgs({ options: { minutes: { type: "string" }, every: { type: "string" }, seed: { type: "string" } } })
const minutes = Number(v.minutes ?? 10)
const everyS = Number(v.every ?? 4)
const rnd = seeded(Number(v.seed ?? 1))
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

const server = await startLocalNatsServer({ port: 0 })
const cluster = makeCluster(server.url, drillPatch({ job: "soak", workers: 3, psShards: 2, steps: 1_000_000, checkpointEvery: 10 }))
const obs = await observe(server.url, cluster.job)
cluster.spawnServices()
const workers = ["w0", "w1", "w2"]
for (const w of workers) cluster.spawn("worker", w)
const faults: Record<string, number> = { worker: 0, "param-server": 0, loader: 0, "nats-server": 0 }
const t0 = Date.now()
const end = t0 + minutes * 60_000
process.stdout.write(`soak: ${minutes} min, a fault every ~${everyS} s (seed ${v.seed ?? 1}), nats ${server.url}\n`)
while (Date.now() < end) {
  await sleep(everyS * 1000 * (0.5 + rnd()))
  const r = rnd()
  if (r < 0.1) {
    await server.restart()
    faults["nats-server"]++
    continue
  }
  const pick = r < 0.6 ? workers[Math.floor(rnd() * workers.length)] : r < 0.9 ? `ps-${Math.floor(rnd() * 2)}` : "loader-0"
  const a = [...cluster.actors].reverse().find((x) => x.id === pick && x.running())
  if (!a) continue
  await a.kill()
  cluster.spawn(a.role, a.id, a.extra.filter((f) => f !== "--no-resume"))
  faults[a.role]++
  process.stdout.write(`  ${((Date.now() - t0) / 1000).toFixed(0)} s: ${a.id} SIGKILLed and relaunched (version ${obs.version()})\n`)
}
// no more faults: the job must move on (a stall here is a bug), then judge the surviving history
const atLastFault = obs.version()
await sleep(15_000)
const version = obs.version()
const moving = version >= atLastFault + 20
const chains = [0, 1].map((k) => survivingChain(obs.appliedOf(k), k))
const ids = chains.map((c) => [...c.values()].flatMap((a) => a.batchIds))
const twice = ids.map((l) => l.length - new Set(l).size)
// the shards' own applied logs (the observer may miss events while nats-server restarts)
// (the job still runs: the two shards may be one version apart for a moment, so look again)
const logsEqual = Effect.gen(function* () {
  const bus = yield* Bus
  for (let i = 0; i < 20; i++) {
    const [a, b] = yield* Effect.forEach([0, 1], (k) => ParamServerClient.appliedLog(bus, subjects(cluster.job.job), k, "soak"))
    if (a.version === b.version) return JSON.stringify(a.log) === JSON.stringify(b.log)
    yield* Effect.sleep(50)
  }
  return false
})
const same = await Effect.runPromise(logsEqual.pipe(Effect.provide(NatsBus.layer({ servers: server.url, name: "soak-logs" }))))
const params = await Promise.all([0, 1].map((k) => obs.pull(k)))
const finite = params.every((p) => [...p.params.values()].every((t) => t.every(Number.isFinite)))
if (!moving) process.stdout.write(`soak: the job did not move on after the last fault\n${cluster.logs(30)}\n`)
await obs.close()
await cluster.stop(3_000)
await server.stop()
const ok = twice.every((n) => n === 0) && same && finite && moving
process.stdout.write(
  [
    "",
    "| soak | value |",
    "| --- | ---: |",
    `| minutes | ${minutes} |`,
    ...Object.entries(faults).map(([k, n]) => `| ${k} deaths | ${n} |`),
    `| versions reached | ${version} (${atLastFault} at the last fault) |`,
    `| batches applied (shard 0, surviving history) | ${ids[0].length} |`,
    `| applied twice (shard 0 / 1) | ${twice.join(" / ")} |`,
    `| both shards' applied logs equal | ${same ? "yes" : "NO"} |`,
    `| params finite | ${finite ? "yes" : "NO"} |`,
    "",
    ok ? "soak: ok" : "soak: FAILED"
  ].join("\n") + "\n"
)
process.exit(ok ? 0 : 1)
