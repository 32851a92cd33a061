// Implements: the fault-drill harness (test/faults/*.test.ts), on top of test/support/cluster.ts.
//   - `useDrill({ nodes })`: real nats-server(s) for the file — one (restartable, with a
//     monitoring port) or a loopback cluster of `nodes` — and `start(spec)`, which writes the
//     drill job (drill-job.ts), spawns its topology as processes and observes it.
//   - the faults: `kill(id)` (SIGKILL), `relaunch(id)` (SIGKILL if running, then the same
//     id and flags again; a parameter server comes back WITHOUT --no-resume, so it
//     resumes from its checkpoint), `onPushFrame` (a worker's frame on `ps.<k>.push.<worker>`, to
//     kill it between its pushes to two shards), nats restart/kill and `/connz`.
//   - the checks every drill makes (`verify`): the job completes (shard 0 reaches
//     train.steps, the last process of every worker exits 0); every planned batch is
//     applied exactly once, judged on the surviving history (StepApplied of the final
//     incarnation chain, see `survivingChain`) and on each shard's final applied log
//     (GetAppliedLog on `ps.<k>.log`); the params are finite. `sameParams` compares two
//     runs' params bit for bit.
// Does not own: the actors, the healing protocol, the servers' code (shared/bus/local-server.ts).
import { Effect, Exit, Layer, References, Result, Scope } from "effect"
import { expect } from "vitest"
import { afterAll, beforeAll } from "vitest"
import { Bus } from "../../shared/bus/Bus.ts"
import { NatsBus } from "../../shared/bus/nats.ts"
import { startLocalNatsCluster, startLocalNatsServer, type LocalNatsServer } from "../../shared/bus/local-server.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { AppliedLog as AppliedLogBits, batchId, parseBatchId } from "../../shared/protocol/applied-log.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { AppliedLog, Heartbeat, type StepApplied } from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { H } from "../../shared/wire/frames.ts"
import { T as WT } from "../../shared/wire/transport.ts"
import { mulberry32 } from "../../actors/loader/plan.ts"
import { DRILL_EPOCH_BATCHES, drillPatch, type DrillSpec } from "./drill-job.ts"
import { makeCluster, observe, waitUntil, type ActorExit, type ActorProcess, type Cluster, type Observer } from "./cluster.ts"

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

/** A seeded PRNG (the loader's mulberry32) for kill points: a failing drill can be rerun as it ran. */
export const seeded = mulberry32

// ---------------------------------------------------------------- NATS under test

export interface DrillNats {
  /** what actors get as --nats: every server, comma-separated. */
  readonly url: string
  readonly servers: ReadonlyArray<LocalNatsServer>
  /** Client connections per server (monitoring /connz), by connection name. */
  connections(): Promise<Array<{ index: number; names: string[] }>>
  /** Until every running node routes to every other (a no-op for one server). */
  waitForRoutes(): Promise<void>
  stop(): Promise<void>
}

const connz = async (s: LocalNatsServer): Promise<string[]> => {
  if (!s.running() || s.monitorUrl === undefined) return []
  try {
    const res = await fetch(`${s.monitorUrl}/connz?limit=1024`, { signal: AbortSignal.timeout(2_000) })
    const j = (await res.json()) as { connections?: Array<{ name?: string }> }
    return (j.connections ?? []).map((c) => c.name ?? "")
  } catch {
    return []
  }
}

const startNats = async (nodes: number, maxPayload?: number, jetstream = false): Promise<DrillNats> => {
  if (nodes <= 1) {
    const s = await startLocalNatsServer({ port: 0, httpPort: 0, maxPayload, jetstream })
    return {
      url: s.url,
      servers: [s],
      connections: async () => [{ index: 0, names: await connz(s) }],
      waitForRoutes: async () => {},
      stop: () => s.stop()
    }
  }
  const c = await startLocalNatsCluster({ size: nodes, maxPayload })
  return {
    url: c.urls.join(","),
    servers: c.servers,
    connections: () => Promise.all(c.servers.map(async (s, index) => ({ index, names: await connz(s) }))),
    waitForRoutes: () => c.waitForRoutes(),
    stop: () => c.stop()
  }
}

// ---------------------------------------------------------------- the drill

export interface PushFrame {
  readonly shard: number
  /** the sending worker (from the message id `<sender>-<tag>-<n>`). */
  readonly sender: string
}

export interface DrillReport {
  readonly versions: number
  readonly applied: number
  /** versions of 1..steps the observer missed on some shard (it was disconnected). */
  readonly gaps: number
  readonly holes: readonly string[]
  readonly restarts: Readonly<Record<string, number>>
  readonly incarnations: readonly number[]
  readonly seconds: number
}

export interface Drill {
  readonly job: JobConfig
  readonly spec: DrillSpec
  readonly cluster: Cluster
  readonly obs: Observer
  readonly nats: DrillNats
  readonly workerIds: readonly string[]
  /** loader, scheduler, every shard (fresh: --no-resume), then the workers. */
  startAll(): void
  /** The newest process of an actor id. */
  actor(id: string): ActorProcess
  kill(id: string): Promise<ActorExit>
  /** SIGKILL (if running) and launch again: same id and flags, a PS without --no-resume. */
  /** `env` is added over the process's own (e.g. a FLOTILLA_FAILPOINT for the new process). */
  relaunch(id: string, env?: NodeJS.ProcessEnv): Promise<ActorProcess>
  /** Every frame a worker sends to `ps.<k>.push.<worker>` (a claim or a frame), as it is seen. */
  onPushFrame(f: (p: PushFrame) => void): void
  /** The next frame `sender` sends to shard `shard` (any shard when undefined). */
  nextPushFrame(sender: string, shard?: number, timeoutMs?: number): Promise<PushFrame>
  /** The version every shard has reached (from StepApplied). */
  version(): number
  waitVersion(v: number, timeoutMs?: number): Promise<void>
  /** Shard 0 reached train.steps and the newest process of every worker exited 0. */
  finish(timeoutMs?: number): Promise<void>
  /** The checks of every drill (throws with the logs); returns the figures. */
  verify(o?: { allowGaps?: boolean }): Promise<DrillReport>
  /** Every shard's params, merged (tensor names are unique across shards). */
  params(): Promise<Map<string, Float32Array>>
  /** The last lines of every process, for a failure message. */
  why(): string
}

/**
 * The versions that survive: for each shard, the StepApplied of its final incarnation
 * chain. A new incarnation whose first version is c + 1 resumed at c: every version after
 * c seen so far is recomputed, so it is dropped; events of an older incarnation arriving
 * late are ignored; within an incarnation the last event of a version wins.
 */
export const survivingChain = (applied: readonly StepApplied[], shard: number): Map<number, StepApplied> => {
  const chain = new Map<number, StepApplied>()
  const mine = applied.filter((a) => a.shard === shard)
  const firstOf = new Map<number, number>()
  for (const a of mine) firstOf.set(a.incarnation, Math.min(firstOf.get(a.incarnation) ?? Infinity, a.version))
  let current = -1
  for (const a of mine) {
    if (a.incarnation < current) continue
    if (a.incarnation > current) {
      current = a.incarnation
      const resumedAt = firstOf.get(a.incarnation)! - 1
      for (const v of [...chain.keys()]) if (v > resumedAt) chain.delete(v)
    }
    chain.set(a.version, a)
  }
  return chain
}

const microIds = (a: StepApplied): string[] => a.batchIds.flatMap((id) => id.split("+"))
const globalIndex = (id: string): number => {
  const r = parseBatchId(id)
  if (r === undefined) throw new Error(`not a train batch id: ${id}`)
  return r.epoch * DRILL_EPOCH_BATCHES + r.index
}

/** Compare two runs' params bit for bit; the message names the first difference. */
export const sameParams = (a: Map<string, Float32Array>, b: Map<string, Float32Array>): string | undefined => {
  const names = [...new Set([...a.keys(), ...b.keys()])].sort()
  for (const n of names) {
    const x = a.get(n)
    const y = b.get(n)
    if (x === undefined || y === undefined) return `tensor ${n} only in ${x === undefined ? "the second" : "the first"} run`
    if (x.length !== y.length) return `tensor ${n}: ${x.length} vs ${y.length} values`
    const xb = new Uint32Array(x.buffer, x.byteOffset, x.length)
    const yb = new Uint32Array(y.buffer, y.byteOffset, y.length)
    let diffs = 0
    let first = -1
    let maxAbs = 0
    for (let i = 0; i < x.length; i++) {
      if (xb[i] !== yb[i]) {
        diffs++
        if (first < 0) first = i
        maxAbs = Math.max(maxAbs, Math.abs(x[i] - y[i]))
      }
    }
    if (diffs > 0) return `tensor ${n}: ${diffs}/${x.length} values differ (first at ${first}: ${x[first]} vs ${y[first]}; max |Δ| ${maxAbs})`
  }
  return undefined
}

/**
 * The set-up of a drill file: NATS for the file (`nodes` servers; 1 = a single server;
 * `maxPayload` small to cut each push into several frames),
 * `start(spec)` for each run; every run and the servers are stopped after the file.
 */
export const useDrill = (o: { nodes?: number; maxPayload?: number; jetstream?: boolean } = {}) => {
  let nats: DrillNats | undefined
  const runs: Array<{ cluster: Cluster; obs: Observer; close: () => Promise<void> }> = []
  beforeAll(async () => {
    nats = await startNats(o.nodes ?? 1, o.maxPayload, o.jetstream)
  })
  afterAll(async () => {
    for (const r of runs) {
      await r.obs.close().catch(() => {})
      await r.close().catch(() => {})
      await r.cluster.stop(3_000)
    }
    await nats?.stop()
  })
  return {
    nats: () => nats!,
    start: async (spec: DrillSpec): Promise<Drill> => {
      const d = await startDrill(nats!, spec)
      runs.push({ cluster: d.cluster, obs: d.obs, close: d.close })
      return d
    },
    /** Stop a finished run's processes now (frees the cores for the next run). */
    stopRun: async (d: Drill) => {
      await d.obs.close().catch(() => {})
      await d.cluster.stop(3_000)
    }
  }
}

const startDrill = async (nats: DrillNats, spec: DrillSpec): Promise<Drill & { close(): Promise<void> }> => {
  const t0 = Date.now()
  const cluster = makeCluster(nats.url, drillPatch(spec))
  const job = cluster.job
  const s = subjects(job.job)
  const obs = await observe(nats.url, job)
  // a pipeline replica w<i> is its stage workers: w<i> (stage 0), w<i>-s1, …
  const S = spec.stages ?? 1
  const workerIds = Array.from({ length: spec.workers }, (_, i) => Array.from({ length: S }, (_, k) => (k === 0 ? `w${i}` : `w${i}-s${k}`))).flat()
  const workerArgs = (w: string): string[] => {
    if (S === 1) return []
    const m = /^(w\d+)(?:-s(\d+))?$/.exec(w)!
    return ["--stage", m[2] ?? "0", "--replica", m[1]]
  }
  const restarts: Record<string, number> = {}

  // a second connection of our own: PS heartbeat info (incarnation, version), push frames,
  // and the applied-log requests
  const scope = Scope.makeUnsafe()
  const quiet = Layer.succeed(References.MinimumLogLevel, "Error")
  const ctx = await Effect.runPromise(
    Layer.buildWithScope(NatsBus.layer({ servers: nats.url.split(","), name: `flotilla-${job.job}-test-drill` }), scope).pipe(Effect.provide(quiet))
  )
  const run = <A, E>(eff: Effect.Effect<A, E, Bus | Scope.Scope>): Promise<A> =>
    Effect.runPromise(eff.pipe(Scope.provide(scope), Effect.provideContext(ctx)) as Effect.Effect<A, E>)
  const resumed = new Map<number, number>() // incarnation -> lowest version its heartbeats reported
  const latestInc = new Map<number, number>() // shard -> newest incarnation heard of
  const pushListeners: Array<(p: PushFrame) => void> = []
  await run(
    Effect.gen(function* () {
      const bus = yield* Bus
      yield* bus.subscribe(`${s.prefix}.hb.ps.*`, (m) => {
        const r = decodeBytes(Heartbeat, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.void
        const inc = Number(r.success.info?.["incarnation"])
        const v = Number(r.success.info?.["version"])
        if (Number.isFinite(inc) && Number.isFinite(v)) resumed.set(inc, Math.min(resumed.get(inc) ?? Infinity, v))
        const shard = Number(r.success.info?.["shard"])
        if (Number.isFinite(inc) && Number.isFinite(shard)) latestInc.set(shard, Math.max(latestInc.get(shard) ?? 0, inc))
        return Effect.void
      })
      for (let k = 0; k < job.topology.psShards; k++) {
        yield* bus.subscribe(s.psPushAny(k), (m) => {
          const id = m.headers[WT.claim] ?? m.headers[H.id]
          if (id === undefined || pushListeners.length === 0) return Effect.void
          const sender = workerIds.find((w) => id.startsWith(`${w}-`))
          if (sender !== undefined) for (const f of [...pushListeners]) f({ shard: k, sender })
          return Effect.void
        })
      }
      yield* bus.flush()
    })
  )

  const actor = (id: string): ActorProcess => {
    const all = cluster.actors.filter((a) => a.id === id)
    if (all.length === 0) throw new Error(`no actor ${id}`)
    return all[all.length - 1]
  }
  const why = () => `\n(at version ${current()}; restarts ${JSON.stringify(restarts)})\n${cluster.logs(30)}`
  const chainOf = (k: number) => survivingChain(obs.applied, k)
  /**
   * The version every shard's surviving history has reached; a shard whose newest
   * incarnation (from its heartbeats) has applied nothing yet counts at its resume version.
   */
  const current = () => {
    let v = Infinity
    for (let k = 0; k < job.topology.psShards; k++) {
      const chain = chainOf(k)
      let top = Math.max(0, ...chain.keys())
      const inc = latestInc.get(k)
      if (inc !== undefined && ![...chain.values()].some((a) => a.incarnation >= inc)) top = Math.min(top, resumed.get(inc) ?? 0)
      v = Math.min(v, top)
    }
    return v
  }

  const fetchLog = (k: number) =>
    run(
      Effect.gen(function* () {
        const bus = yield* Bus
        const req = encodeMessage({ _tag: "GetAppliedLog", v: PROTOCOL_VERSION, from: "test-drill" })
        const reply = yield* bus.request(s.psLog(k), req, { timeoutMs: 3_000 }).pipe(
          Effect.retry({ times: 5 }),
          Effect.mapError((e) => new Error(`shard ${k}: no answer to GetAppliedLog on ${s.psLog(k)}: ${e.message}`))
        )
        const r = decodeBytes(AppliedLog, reply.subject, reply.data)
        if (Result.isFailure(r)) return yield* Effect.fail(new Error(`shard ${k}: bad AppliedLog reply: ${String(r.failure)}`))
        return r.success
      })
    )

  const drill: Drill & { close(): Promise<void> } = {
    job,
    spec,
    cluster,
    obs,
    nats,
    workerIds,
    startAll: () => {
      cluster.spawnServices()
      for (const w of workerIds) cluster.spawn("worker", w, workerArgs(w))
    },
    actor,
    kill: (id) => actor(id).kill(),
    relaunch: async (id, env) => {
      const a = actor(id)
      const shard = a.role === "param-server" ? Number(a.extra[a.extra.indexOf("--shard") + 1]) : -1
      const before = latestInc.get(shard) ?? 0
      await a.kill()
      restarts[id] = (restarts[id] ?? 0) + 1
      const b = cluster.spawn(a.role, a.id, a.extra.filter((f) => f !== "--no-resume"), { ...a.env, FLOTILLA_FAILPOINT: undefined, ...env })
      // a parameter server is back once its new incarnation speaks (heartbeat info)
      if (shard >= 0) {
        await waitUntil(() => (latestInc.get(shard) ?? 0) > before, 60_000, () => `a new incarnation of ${id} (heartbeat info {shard, version, incarnation})${why()}`)
      }
      return b
    },
    onPushFrame: (f) => void pushListeners.push(f),
    nextPushFrame: (sender, shard, timeoutMs = 30_000) =>
      new Promise<PushFrame>((res, rej) => {
        const f = (p: PushFrame) => {
          if (p.sender !== sender || (shard !== undefined && p.shard !== shard)) return
          clearTimeout(t)
          pushListeners.splice(pushListeners.indexOf(f), 1)
          res(p)
        }
        const t = setTimeout(() => {
          pushListeners.splice(pushListeners.indexOf(f), 1)
          rej(new Error(`no push frame from ${sender}${shard === undefined ? "" : ` to shard ${shard}`} within ${timeoutMs} ms${why()}`))
        }, timeoutMs)
        pushListeners.push(f)
      }),
    version: () => current(),
    waitVersion: (v, timeoutMs = 30_000) => obs.until(() => current() >= v, timeoutMs, () => `version ${v}${why()}`),
    finish: async (timeoutMs = 45_000) => {
      const steps = job.train.steps
      await obs.until(() => obs.appliedOf(0).some((a) => a.version >= steps), timeoutMs, () => `shard 0 at version ${steps}${why()}`)
      for (const w of workerIds) {
        const p = actor(w)
        const exit = await Promise.race([p.exited, sleep(20_000).then(() => undefined)])
        expect(exit, `${w} exits by itself once the job is done${why()}`).toEqual({ code: 0, signal: null })
      }
    },
    verify: async (opts = {}) => {
      const steps = job.train.steps
      const shards = job.topology.psShards
      const chains = Array.from({ length: shards }, (_, k) => chainOf(k))
      let gaps = 0
      const sets: Array<Set<string>> = []
      for (let k = 0; k < shards; k++) {
        const chain = chains[k]
        const missing = Array.from({ length: steps }, (_, i) => i + 1).filter((v) => !chain.has(v))
        gaps += missing.length
        if (!opts.allowGaps) expect(missing, `shard ${k}: versions missing from the surviving history${why()}`).toEqual([])
        const ids = [...chain.values()].flatMap(microIds)
        const twice = ids.filter((id, i) => ids.indexOf(id) !== i)
        expect(twice, `shard ${k}: batches applied more than once (surviving history)${why()}`).toEqual([])
        sets.push(new Set(ids))
        if (k > 0) {
          for (const [v, a] of chain) {
            const lead = chains[0].get(v)
            if (lead !== undefined) expect(a.batchIds, `version ${v}: shard ${k} applied what shard 0 decided`).toEqual(lead.batchIds)
          }
        }
      }
      // the final applied logs: the authority on "applied" (the observer may have missed events)
      const logs = await Promise.all(Array.from({ length: shards }, (_, k) => fetchLog(k)))
      const logSets = logs.map((l) => {
        const bits = AppliedLogBits.fromJSON(l.log)
        const out = new Set<string>()
        const hi = (Math.max(bits.openFrom, ...bits.openEpochs) + 1) * DRILL_EPOCH_BATCHES
        for (let g = 0; g < hi; g++) {
          const id = batchId(Math.floor(g / DRILL_EPOCH_BATCHES), g % DRILL_EPOCH_BATCHES)
          if (bits.hasId(id)) out.add(id)
        }
        return out
      })
      for (let k = 0; k < shards; k++) {
        expect(logs[k].version, `shard ${k}: final version`).toBeGreaterThanOrEqual(steps)
        for (const id of sets[k]) expect(logSets[k].has(id), `shard ${k}: ${id} applied (surviving history) but not in its log`).toBe(true)
        if (!opts.allowGaps) expect(logSets[k].size, `shard ${k}: log size = batches in the surviving history`).toBe(sets[k].size)
        expect([...logSets[k]].sort(), `shards 0 and ${k} applied the same batches`).toEqual([...logSets[0]].sort())
      }
      // planned range: every batch up to the last applied one, except the few still leased
      // when the final version came out (at most one prefetch + one in hand per worker)
      const applied = [...logSets[0]].map(globalIndex).sort((a, b) => a - b)
      const top = applied.length === 0 ? -1 : applied[applied.length - 1]
      const holes: string[] = []
      for (let g = 0; g <= top; g++) {
        const id = batchId(Math.floor(g / DRILL_EPOCH_BATCHES), g % DRILL_EPOCH_BATCHES)
        if (!logSets[0].has(id)) holes.push(id)
      }
      const budget = spec.workers === 1 ? 0 : 2 * spec.workers * (spec.accumulate ?? 1)
      expect(holes.length, `planned batches never applied (${holes.join(", ")}); at most ${budget} may be in flight at the end${why()}`).toBeLessThanOrEqual(budget)
      // and those were leased near the end: a hole an epoch behind the last applied batch was
      // skipped (given up, or lost), not in flight
      const old = holes.filter((id) => globalIndex(id) < top - Math.max(4 * budget, DRILL_EPOCH_BATCHES))
      expect(old, `batches skipped long before the end${why()}`).toEqual([])
      // finite params on every shard
      for (let k = 0; k < shards; k++) {
        const p = await obs.pull(k)
        expect(p.version, `shard ${k}: params version`).toBeGreaterThanOrEqual(steps)
        for (const [name, t] of p.params) {
          let bad = 0
          for (let i = 0; i < t.length; i++) if (!Number.isFinite(t[i])) bad++
          expect(bad, `shard ${k}: non-finite values in ${name}`).toBe(0)
        }
      }
      const incarnations = [...new Set(obs.applied.map((a) => a.incarnation))].sort((a, b) => a - b)
      return { versions: steps, applied: logSets[0].size, gaps, holes, restarts: { ...restarts }, incarnations, seconds: (Date.now() - t0) / 1000 }
    },
    params: async () => {
      const out = new Map<string, Float32Array>()
      for (let k = 0; k < job.topology.psShards; k++) for (const [n, t] of (await obs.pull(k)).params) out.set(n, t)
      return out
    },
    why,
    close: () => Effect.runPromise(Scope.close(scope, Exit.void))
  }
  return drill
}

export { waitUntil }
