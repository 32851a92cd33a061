// Checks: receivers trust nothing, against a live job. A real nats-server, every actor its
// own process (loader, scheduler with the controller, 2 parameter-server shards, 2
// workers, an evaluator), a tiny GPT trained with SGD (clipNorm 0). While it trains, this
// process sends 1,000 bad inputs drawn by a seeded PRNG (test/support/fuzz-inputs.ts):
// malformed control requests and forged control events; gradient pushes and params
// bundles with wrong shapes, dtypes, NaN/Inf, bad metadata numbers, stale or future
// versions; raw frames that are oversize, truncated, corrupt, with huge declared chunk
// counts or reused ids — and answers some of the servers' LR requests itself with LRs out
// of bounds. Each input must be refused with a reason: a control request by its
// ControlRejected reply, everything else by at least one Rejected on `errors` naming it
// (its tag is its sender and its message id's first part); a refused LR reply by the
// shard's Rejected. A message refused only at its reassembly timeout (a chunk that never
// comes) goes to a shard's push subject: the shards outlive the job, the workers may exit
// before the timeout. No actor exits early or restarts; the job completes; every batch is
// applied exactly once; no fuzz sender ever contributes; every LR is the schedule's; and
// the final params equal an in-process replay of the applied batches (test/support/
// replay.ts) within 5e-5 (float32 order over 400 steps), as a run without the fuzz does (test/dp.equivalence.test.ts).
// Prints the table: inputs by kind, refused, actors restarted, worst param error.
// Run: npx vitest run test/fuzz.test.ts   (~30 s on 2 cores)
import { Effect, Exit, Layer, References, Result, Scope } from "effect"
import { describe, expect, it } from "vitest"
import { Bus, type BusMessage, type BusShape } from "../shared/bus/Bus.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { ControlApplied, ControlReply } from "../shared/protocol/control.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { GetLr, type StepApplied } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { bundleLimits, shardOfForJob } from "../shared/models/pipeline.ts"
import { modelForJob } from "../shared/models/zoo.ts"
import { useCluster } from "./support/cluster.ts"
import { fuzzInputs, type FuzzInput } from "./support/fuzz-inputs.ts"
import { replay, worstTensor } from "./support/replay.ts"

const N = 1_000
const SEED = 20_251
const STEPS = 400
const LR = 0.05
const JOB = {
  job: "fuzz",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 2, valBatches: 1 },
  train: { steps: STEPS, clipNorm: 0, evalEvery: 1000, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 15_000, leaseTimeoutMs: 30_000, seed: 7 },
  optimizer: { kind: "sgd", momentum: 0.9, weightDecay: 0.01 },
  schedule: { kind: "constant", lr: LR },
  topology: { workers: 2, psShards: 2 }
}
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

/** A NATS connection of the test process, as the Bus the actors use. */
const fuzzBus = async (url: string) => {
  const scope = Scope.makeUnsafe()
  const ctx = await Effect.runPromise(Layer.buildWithScope(NatsBus.layer({ servers: [url], name: "flotilla-fuzz" }), scope).pipe(Effect.provide(Layer.succeed(References.MinimumLogLevel, "Warn"))))
  const run = <A, E>(eff: Effect.Effect<A, E, Bus | Scope.Scope>): Promise<A> => Effect.runPromise(eff.pipe(Scope.provide(scope), Effect.provideContext(ctx)) as Effect.Effect<A, E>)
  const bus = await run(Effect.gen(function* () { return yield* Bus }))
  return { bus, run, close: () => Effect.runPromise(Scope.close(scope, Exit.void)) }
}

describe("fuzz: a live job under 1,000 bad inputs", () => {
  const suite = useCluster()

  it("refuses every one with a reason, stays up, and trains exactly as without them", async () => {
    const { cluster, obs } = await suite.start(JOB)
    const job = cluster.job
    const s = subjects(job.job)
    cluster.spawnServices()
    cluster.spawn("worker", "worker-a")
    cluster.spawn("worker", "worker-b")
    cluster.spawn("evaluator", "evaluator-0")
    // when each process exits (none may before the job's last version)
    const exitedAt = new Map<string, number>()
    for (const a of cluster.actors) void a.exited.then(() => exitedAt.set(a.id, Date.now()))
    const fz = await fuzzBus(cluster.url)
    const { bus, run } = fz
    try {
      // version 30 first: a forged version 0 of a server is then behind what every receiver last
      // heard from that server (its heartbeats lag its broadcasts by up to heartbeatMs) by more than STALE_SLACK
      await obs.until(() => obs.version() >= 30, 60_000, () => `version 30 (at ${obs.version()})\n${cluster.logs()}`)

      // ---- one legit command first, so every control listener has a cursor (epoch, seq)
      const events: ControlApplied[] = []
      await run(bus.subscribe(s.controlApplied, (m) => Effect.sync(() => { const r = decodeBytes(ControlApplied, m.subject, m.data); if (Result.isSuccess(r)) events.push(r.success) })))
      const ok = await run(bus.request(`${s.prefix}.control.checkpoint`, encodeMessage({ _tag: "CheckpointJob", v: PROTOCOL_VERSION, job: job.job, sender: "fuzz-test", requestId: "legit-1" }), { timeoutMs: 5_000 }))
      expect(new TextDecoder().decode(ok.data)).toMatch(/ControlAccepted/)
      await obs.until(() => events.length > 0, 5_000, "the checkpoint's broadcast")
      await sleep(2_500) // one replay: a listener that missed it has it now

      // ---- bad LR replies: this process joins the scheduler's queue group for its first 24 requests
      const lrReplies: string[] = []
      const badLr = (req: GetLr, n: number) =>
        n % 4 === 0 ? encodeMessage({ _tag: "LrForStep", v: PROTOCOL_VERSION, step: req.step, lr: 1e30, schedule: "constant" })
        : n % 4 === 1 ? encodeMessage({ _tag: "LrForStep", v: PROTOCOL_VERSION, step: req.step, lr: -0.5, schedule: "constant" })
        : n % 4 === 2 ? encodeMessage({ _tag: "LrForStep", v: PROTOCOL_VERSION, step: req.step + 7, lr: 0.1, schedule: "constant" })
        : new TextEncoder().encode(`{"_tag":"LrForStep","v":1,"step":${req.step},"lr":1e999,"schedule":"constant"}`)
      // (it leaves the group after its 24th reply: a member that stops answering would cost the shards a timeout per request)
      let lrSub: { readonly unsubscribe: Effect.Effect<void> } | undefined
      lrSub = await run(bus.subscribe(s.lr, (m: BusMessage) => {
        const r = decodeBytes(GetLr, m.subject, m.data)
        if (Result.isFailure(r) || lrReplies.length >= 24) return Effect.void
        lrReplies.push(["lr 1e30", "lr -0.5", "another step", "lr Infinity"][lrReplies.length % 4])
        const leave = lrReplies.length === 24 && lrSub ? Effect.forkDetach(lrSub.unsubscribe) : Effect.void
        return bus.respond(m, badLr(r.success, lrReplies.length - 1)).pipe(Effect.andThen(leave), Effect.asVoid)
      }, { queue: "scheduler" }))

      // ---- the 1,000 inputs
      const model = modelForJob(job)
      const incarnations = [0, 1].map((k) => obs.appliedOf(k).at(-1)!.incarnation)
      const base = { job, specs: model.specs, shardOf: shardOfForJob(job, model), incarnations, epoch: events[0].epoch ?? 0, seq: events[0].seq, maxPayload: bus.maxPayload, maxMessageBytes: bundleLimits(job, model).maxMessageBytes }
      const inputs = fuzzInputs(N, SEED)
      const replies = new Map<number, string>()
      const t0 = Date.now()
      // each input is made against the live version (a push of an old one would be refused `stale` before its own defect is seen)
      const sendOne = (x: FuzzInput): Effect.Effect<void> =>
        Effect.suspend(() => {
          const m = x.build({ ...base, version: obs.version() })
          return m.request
            ? bus.request(m.request.subject, m.request.data, { timeoutMs: 5_000 }).pipe(
                Effect.map((r) => { const d = decodeBytes(ControlReply, r.subject, r.data); replies.set(x.i, Result.isSuccess(d) ? d.success._tag : "undecodable") }),
                Effect.catch((e) => Effect.sync(() => void replies.set(x.i, `no reply: ${e.message}`)))
              )
            : Effect.forEach(m.publish, (p) => bus.publish(p.subject, p.data, { headers: p.headers }).pipe(Effect.ignore), { discard: true })
        })
      // control requests 16 at a time (each waits for its reply), everything else in order
      await run(Effect.forEach(inputs, sendOne, { concurrency: 16, discard: true }).pipe(Effect.andThen(bus.flush())))
      const sentIn = Date.now() - t0
      const versionAfterFuzz = obs.version()
      expect(versionAfterFuzz, `the job was still training when the last input went out (${sentIn} ms)`).toBeLessThan(STEPS)

      // ---- the job completes; every input is refused (the truncated ones at their reassembly timeout, 10 s)
      await obs.until(() => obs.version() >= STEPS - 1, 90_000, () => `version ${STEPS - 1} (at ${obs.version()})\n${cluster.logs()}`)
      expect([...exitedAt.keys()], "processes that exited before the job's last version").toEqual([])
      await obs.until(() => obs.version() >= STEPS, 30_000, () => `version ${STEPS} (at ${obs.version()})\n${cluster.logs()}`)
      const refusedBy = (x: FuzzInput) => obs.errors.filter((e) => e.sender === x.tag || (e.messageId ?? "").startsWith(`${x.tag}-`))
      const accounted = (x: FuzzInput) => (x.isRequest ? replies.get(x.i) === "ControlRejected" : refusedBy(x).length > 0)
      await obs.until(() => inputs.every(accounted), 30_000, () => `every input refused; not: ${inputs.filter((x) => !accounted(x)).slice(0, 8).map((x) => `${x.tag} ${x.group}/${x.kind} ${replies.get(x.i) ?? ""}`).join("; ")}`)
      await obs.until(() => obs.errors.filter((e) => /LR reply refused/.test(e.reason)).length >= lrReplies.length, 10_000, "every bad LR reply refused")
      await run(lrSub.unsubscribe)
      expect(lrReplies.length, "bad LR replies sent").toBe(24)

      // ---- the actors: the services run, the workers and the evaluator ended on their own, nothing restarted
      const byId = new Map(cluster.actors.map((a) => [a.id, a]))
      for (const id of ["loader-0", "scheduler-0", "ps-0", "ps-1"]) expect(byId.get(id)!.running(), `${id} is up\n${cluster.logs()}`).toBe(true)
      for (const id of ["worker-a", "worker-b", "evaluator-0"]) {
        const exit = await Promise.race([byId.get(id)!.exited, sleep(20_000).then(() => undefined)])
        expect(exit, `${id} exits 0 at the end\n${cluster.logs()}`).toEqual({ code: 0, signal: null })
      }
      const restarted = cluster.actors.length - byId.size // one process per id: nothing was started twice
      expect(restarted).toBe(0)

      // ---- what the shards applied: versions 1..STEPS, the same batches on both, each once, only the workers, the schedule's LR
      const versions: StepApplied[] = []
      const seen = new Set<string>()
      for (let v = 1; v <= STEPS; v++) {
        const [a0, a1] = [0, 1].map((k) => obs.appliedOf(k).filter((a) => a.version === v).at(-1))
        expect(a0, `shard 0 reported version ${v}`).toBeDefined()
        expect(a1?.batchIds, `version ${v}: shard 1 applied shard 0's batches`).toEqual(a0!.batchIds)
        for (const id of a0!.batchIds) {
          expect(seen.has(id), `batch ${id} applied twice`).toBe(false)
          seen.add(id)
        }
        expect(a0!.contributors.every((c) => c === "worker-a" || c === "worker-b"), `version ${v}: ${a0!.contributors}`).toBe(true)
        expect(a0!.lr, `version ${v}'s LR`).toBe(LR)
        versions.push(a0!)
      }
      const pulled = [await obs.pull(0), await obs.pull(1)]
      expect(pulled.map((p) => p.version)).toEqual([STEPS, STEPS])
      const ref = await replay(job, versions.map((a) => ({ version: a.version, batchIds: a.batchIds, lr: a.lr })))
      const worst = worstTensor(model.specs.map((x) => x.name), new Map([...pulled[0].params, ...pulled[1].params]), ref.params)

      // ---- the table
      const rows = new Map<string, { group: string; kind: string; sent: number; refused: number; codes: Set<string> }>()
      for (const x of inputs) {
        const row = rows.get(`${x.group}|${x.kind}`) ?? { group: x.group, kind: x.kind, sent: 0, refused: 0, codes: new Set<string>() }
        row.sent++
        if (accounted(x)) row.refused++
        for (const e of refusedBy(x)) row.codes.add(e.code)
        if (x.isRequest) row.codes.add(replies.get(x.i) ?? "-")
        rows.set(`${x.group}|${x.kind}`, row)
      }
      const lrRefused = obs.errors.filter((e) => /LR reply refused/.test(e.reason)).length
      const lines = [...rows.values()].map((r) => `| ${r.group} | ${r.kind} | ${r.sent} | ${r.refused} | ${[...r.codes].sort().join(", ")} |`)
      console.info([
        `[fuzz] ${N} inputs (seed ${SEED}) sent in ${sentIn} ms between versions 30 and ${versionAfterFuzz} of ${STEPS}; ${obs.errors.length} Rejected on errors`,
        "| group | kind | sent | refused | codes |", "| --- | --- | ---: | ---: | --- |", ...lines,
        `| LR reply (this process in the scheduler's queue group) | ${[...new Set(lrReplies)].join(", ")} | ${lrReplies.length} | ${Math.min(lrRefused, lrReplies.length)} | invalid-value |`,
        `| total | | ${N} | ${inputs.filter(accounted).length} | |`,
        `[fuzz] actors restarted: ${restarted}; early exits: 0; versions ${STEPS}, batches applied ${seen.size} (each once); worst param error vs replay ${worst.err.toExponential(2)} (${worst.name})`
      ].join("\n"))
      // float32 summation order (two workers' mean vs one replay) drifts over 400 chaotic steps: 0.3–1.1e-5
      // seen here; one bad input applied, or one batch applied twice, moves a tensor by ~lr·|g|/|p| ≫ 5e-5
      expect(worst.err, worst.all.map((e) => `${e.name} ${e.err.toExponential(1)}`).join(", ")).toBeLessThan(5e-5)
      expect(inputs.filter(accounted).length).toBe(N)
    } finally {
      await fz.close()
    }
  }, 170_000)
})
