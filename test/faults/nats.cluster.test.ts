// Drill: a 3-node NATS cluster on loopback (startLocalNatsCluster: explicit routes, every
// node's /routez checked). First the cluster itself: a message published on one node
// reaches a subscriber on another, and a NatsBus client given every URL, whose server is
// SIGKILLed, moves to another node and keeps its subscriptions. Then a job (2 workers,
// 2 shards) with every actor given every URL: once it runs, the node most of its actors
// are connected to (monitoring /connz) is SIGKILLed; the job completes, every planned
// batch applied exactly once, params finite.
// Run: npx vitest run test/faults/nats.cluster.test.ts   (~20-30 s on 2 cores)
import { Effect, Exit, Layer, References, Scope } from "effect"
import { describe, expect, it } from "vitest"
import { Bus, decodeUtf8, encodeUtf8 } from "../../shared/bus/Bus.ts"
import { NatsBus } from "../../shared/bus/nats.ts"
import { sleep, useDrill } from "../support/faults.ts"

/** A NatsBus client of our own, on `servers`. */
const client = async (servers: readonly string[], name: string) => {
  const scope = Scope.makeUnsafe()
  const ctx = await Effect.runPromise(
    Layer.buildWithScope(NatsBus.layer({ servers, name }), scope).pipe(Effect.provide(Layer.succeed(References.MinimumLogLevel, "Error")))
  )
  const run = <A, E>(eff: Effect.Effect<A, E, Bus | Scope.Scope>): Promise<A> =>
    Effect.runPromise(eff.pipe(Scope.provide(scope), Effect.provideContext(ctx)) as Effect.Effect<A, E>)
  return { run, close: () => Effect.runPromise(Scope.close(scope, Exit.void)) }
}

describe("a 3-node NATS cluster", () => {
  const suite = useDrill({ nodes: 3 })

  it("routes between its nodes, and a client given every URL survives its server's SIGKILL", async () => {
    const nats = suite.nats()
    expect(nats.servers.length).toBe(3)
    const sub = await client(nats.url.split(","), "drill-sub")
    const at = (await nats.connections()).find((c) => c.names.includes("drill-sub"))!.index
    // the publisher on another node: every message crosses a route
    const pub = await client([nats.servers[(at + 1) % 3].url], "drill-pub")
    try {
      const got: string[] = []
      await sub.run(Effect.gen(function* () {
        const bus = yield* Bus
        yield* bus.subscribe("drill.cluster", (m) => Effect.sync(() => void got.push(decodeUtf8(m.data))))
        yield* bus.flush()
      }))
      const send = (text: string) => pub.run(Effect.gen(function* () {
        const bus = yield* Bus
        yield* bus.publish("drill.cluster", encodeUtf8(text))
        yield* bus.flush()
      }))
      // interest propagates over the routes asynchronously: publish until one arrives
      const deliver = async (tag: string) => {
        for (let i = 0; i < 200 && !got.some((g) => g.startsWith(tag)); i++) {
          await send(`${tag}-${i}`)
          await sleep(25)
        }
        expect(got.some((g) => g.startsWith(tag)), `a message ${tag} crossed the cluster`).toBe(true)
      }
      await deliver("before")
      // SIGKILL the subscriber's server: it moves to a live node, its subscription with it
      const victim = nats.servers[at]
      await victim.kill()
      expect(victim.running()).toBe(false)
      await deliver("after")
      const now = await nats.connections()
      expect(now.find((c) => c.names.includes("drill-sub"))?.index, "the subscriber moved to a live node").not.toBe(at)
      await victim.restart()
      await nats.waitForRoutes()
    } finally {
      await pub.close()
      await sub.close()
    }
  }, 30_000)

  it("a job survives SIGKILL of the server most of its actors are connected to", async () => {
    const d = await suite.start({ job: "drill-cluster", workers: 2, psShards: 2, steps: 120 })
    d.startAll()
    await d.waitVersion(15, 60_000)
    // count the job's actors per node (not the test's own connections)
    const conns = await d.nats.connections()
    const actors = (names: string[]) => names.filter((n) => n.startsWith(`flotilla-${d.job.job}-`) && !n.includes("-test-")).length
    const counts = conns.map((c) => actors(c.names))
    expect(counts.reduce((a, b) => a + b, 0), `every actor connected (${JSON.stringify(conns)})`).toBeGreaterThanOrEqual(6)
    const target = counts.indexOf(Math.max(...counts))
    const at = d.version()
    await d.nats.servers[target].kill()
    console.info(`[nats.cluster] SIGKILLed node ${target + 1} (${counts[target]} of ${counts.reduce((a, b) => a + b, 0)} actors on it) at version ${at}`)
    await d.waitVersion(at + 10, 30_000)
    // every actor found a live node
    const total = counts.reduce((a, b) => a + b, 0)
    let after: number[] = []
    for (let i = 0; i < 100; i++) {
      after = (await d.nats.connections()).map((c) => actors(c.names))
      if (after.reduce((a, b) => a + b, 0) >= total) break
      await sleep(100)
    }
    expect(after.reduce((a, b) => a + b, 0), `actors reconnected to the live nodes (${JSON.stringify(after)})`).toBeGreaterThanOrEqual(total)
    await d.finish(60_000)
    const r = await d.verify({ allowGaps: true })
    console.info(`[nats.cluster] ${JSON.stringify(r)}`)
  }, 120_000)
})
