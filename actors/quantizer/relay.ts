/**
 * Implements: the quantizer relay's effectful shell around its reducer (relay-core.ts) —
 * `flotilla launch quantizer --relay NAME`. One queue of events (workers' gradients on
 * `relay.<name>.*.push.<worker>`, the servers' answers on `ps.*.ack.relay-<name>`, membership of the
 * workers whose heartbeats say `relay: NAME`, control, a Tick) feeds the reducer; its
 * effects are performed in order: forward a combination to `ps.<k>.push.relay-<name>`, answer a worker
 * on `relay.<name>.<k>.ack.<worker>` (the servers' answer, passed on).
 *
 * To the parameter servers the relay is ONE worker, `relay-<name>`, while it has workers:
 * it heartbeats as that worker then and leaves (a `leaving` beat) when its last one goes, so
 * no barrier waits for an idle relay; its workers' own heartbeats say `relay: NAME`, so the
 * servers count them for the job's first step but do not wait for them. It always
 * heartbeats as `quantizer-<name>` (info: relay, workers, combined). Launching or stopping a
 * relay needs no restart of anything else; a relay that dies is a worker that died: the
 * servers drop it after livenessMs and its workers' resends reach the relaunched one.
 * Its error-feedback residuals are saved like a worker's (shared/checkpoint/sender-state.ts).
 * Does not own: what it computes (relay-core.ts), the codecs (shared/wire/compression.ts).
 */
import { Deferred, Effect, Exit, Queue, Result, Scope } from "effect"
import { Bus } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat, trackMembership, type HeartbeatHandle } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { bundleLimits, shardOfForJob } from "../../shared/models/pipeline.ts"
import { gradMetaProblem } from "../../shared/protocol/limits.ts"
import { modelForJob, trainableNames } from "../../shared/models/zoo.ts"
import { decodeBytes, decodeValue, encodeMessage } from "../../shared/protocol/decode.ts"
import { GradMeta, PushAck, Rejected, rejected } from "../../shared/protocol/messages.ts"
import { isToken, senderProblem, subjectSender, subjects } from "../../shared/protocol/subjects.ts"
import { SenderResiduals, tensorLengths } from "../../shared/checkpoint/sender-state.ts"
import { parseCodec } from "../../shared/wire/codecs.ts"
import { denseOfWire } from "../../shared/wire/rows.ts"
import { findNonFinite } from "../../shared/optim/clip.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { receiveBundles, sendBundle } from "../../shared/wire/transport.ts"
import { initialRelay, step, type RelayEffect, type RelayEvent, type RelayState } from "./relay-core.ts"

export interface RelayOptions {
  readonly job: JobConfig
  readonly name: string
}

export interface RelayHandle {
  readonly finished: Deferred.Deferred<void>
  readonly state: RelayState
}

const TICK_MS = 100

export const relayId = (name: string) => `relay-${name}`

export const runRelay = (o: RelayOptions): Effect.Effect<RelayHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const { job, name } = o
    const s = subjects(job.job)
    const id = relayId(name)
    const model = modelForJob(job)
    if (job.topology.stages > 1) return yield* Effect.fail(new Error(`job ${job.job} is a pipeline: its stage workers push to the parameter servers directly (a relay sums whole-model gradients)`))
    const shardOf = shardOfForJob(job, model)
    const trainable = new Set(trainableNames(job, model))
    const expected = Array.from({ length: job.topology.psShards }, (_, k) => new Set(model.specs.filter((sp) => shardOf.get(sp.name) === k && trainable.has(sp.name)).map((sp) => sp.name)))
    const shapes = new Map(model.specs.map((sp) => [sp.name, sp.shape]))
    const limits = bundleLimits(job, model)
    const report = makeReporter(bus, s, id)
    const state = initialRelay(
      { job: job.job, name, id, shards: job.topology.psShards, ackTimeoutMs: Math.max(1_000, 4 * job.train.heartbeatMs), waitMs: job.train.livenessMs, shapes },
      job.train.consistency.mode === "sync",
      job.train.compression.minElements,
      Date.now()
    )
    const finished = yield* Deferred.make<void>()
    const queue = yield* Queue.unbounded<RelayEvent>()
    const offer = (e: RelayEvent) => Effect.sync(() => void Queue.offerUnsafe(queue, e))

    // ---- residuals: saved like a worker's (sender-state.ts), restored with the first gradient of
    // every shard, whose params say which run they belong to (a fresh start is a new run)
    const senderState = new SenderResiduals(job, id, state.encoder.residuals, shardOf, tensorLengths(model.specs))
    if (senderState.corrupt) yield* Effect.logWarning(`relay ${name}: ${senderState.corrupt}; starting with zero residuals`)
    const runs = new Map<number, number>()
    const save = (version: number) =>
      Effect.suspend(() => { const err = senderState.trySave(version, runs); return err ? Effect.logWarning(`relay ${name}: ${err}`) : Effect.void })
    yield* Effect.addFinalizer(() => save(Math.max(0, state.newest)).pipe(Effect.ignore))

    // ---- inputs
    const refuse = (worker: string, shard: number, code: Rejected["code"], reason: string, subject: string) =>
      report({ code, reason, subject, sender: worker }).pipe(Effect.flatMap((msg) => bus.publish(s.relayAck(name, shard, worker), encodeMessage(msg))), Effect.ignore)
    const onPush = (shard: number) => (b: TensorBundle, info: { readonly subject: string; readonly from: string }) => {
      const m = b.meta
      if (!isToken(m.sender)) return report({ code: "bad-message", reason: `sender ${JSON.stringify(m.sender)} is not an actor id`, subject: info.subject }).pipe(Effect.asVoid)
      // the subject names the worker (its user alone may publish there): a bundle claiming another is refused to it
      const spoof = senderProblem(info.from, m.sender, "push")
      if (spoof !== undefined) return refuse(subjectSender(info.from), shard, "bad-message", spoof, info.from)
      if (m.kind !== "grads" || m.job !== job.job) return refuse(m.sender, shard, m.job !== job.job ? "wrong-job" : "bad-message", `expected job ${job.job}'s grads, got ${m.job}'s ${m.kind}`, info.subject)
      const g = decodeValue(GradMeta, `${info.subject} meta.extra`, m.extra ?? {})
      if (Result.isFailure(g)) return refuse(m.sender, shard, "bad-message", g.failure.reason, info.subject)
      // a part's numbers weigh it in the relay's mean: held to the job's batch size, as the servers hold the sum
      const odd = gradMetaProblem(job, g.success, (m.batchId ?? g.success.micro).split("+").length)
      if (odd !== undefined) return refuse(m.sender, shard, "invalid-value", odd, info.subject)
      const codec = g.success.stamp ?? "f32"
      if (Result.isFailure(parseCodec(codec))) return refuse(m.sender, shard, "bad-message", `stamp: ${codec} is not a known codec`, info.subject)
      const dense = denseOfWire(b.tensors, (n) => shapes.get(n))
      if ("problem" in dense) return refuse(m.sender, shard, "bad-tensor", dense.problem, info.subject)
      const names = [...dense.grads.keys()]
      const want = expected[shard]
      if (names.length !== want.size || names.some((n) => !want.has(n))) {
        return refuse(m.sender, shard, "bad-tensor", `shard ${shard}'s gradient has tensors [${names.sort()}]; this job's are [${[...want].sort()}]`, info.subject)
      }
      const nf = findNonFinite(dense.grads)
      if (nf !== undefined) return refuse(m.sender, shard, "invalid-value", `gradient ${nf.name} has a non-finite value at ${nf.index}`, info.subject)
      if (g.success.run !== undefined) runs.set(shard, g.success.run)
      let note: Effect.Effect<void> = Effect.void
      if (senderState.waiting && runs.size === job.topology.psShards) {
        const restored = senderState.restore((k) => runs.get(k))
        if (restored !== undefined) note = Effect.logInfo(`relay ${name}: ${restored}`)
      }
      return note.pipe(Effect.andThen(offer({ _tag: "Received", shard, worker: m.sender, version: m.version, batchId: m.batchId ?? g.success.micro, codec, meta: g.success, grads: dense.grads })))
    }
    for (let k = 0; k < job.topology.psShards; k++) {
      yield* receiveBundles(bus, s.relayPushAny(name, k), onPush(k), { ...limits, onError: (e, info) => report({ code: "wire", reason: e.message, subject: info.subject }).pipe(Effect.asVoid) })
    }
    yield* bus.subscribe(s.psAckFor(id), (m) => {
      const shard = Number(m.subject.split(".").at(-3))
      const a = decodeBytes(PushAck, m.subject, m.data)
      if (Result.isSuccess(a)) return offer({ _tag: "ServerAcked", ack: a.success })
      const r = decodeBytes(Rejected, m.subject, m.data)
      return Result.isSuccess(r) ? offer({ _tag: "ServerRefused", shard, rejected: r.success }) : Effect.void
    })
    yield* trackMembership(s, job.train.livenessMs, (e) =>
      e.member.role !== "worker" || e.member.info?.relay !== name ? Effect.void : offer(e.kind === "left" ? { _tag: "MemberLeft", id: e.member.id } : { _tag: "MemberJoined", id: e.member.id })
    )
    yield* onControl(s, {
      stop: () => Deferred.succeed(finished, undefined).pipe(Effect.asVoid),
      "set-consistency": (c) => offer({ _tag: "ConsistencyChanged", mode: c.mode })
    }, id)

    // ---- heartbeats: always as the quantizer; as the servers' worker only while it has workers
    const own = yield* runHeartbeat(s, "quantizer", `quantizer-${name}`, job.train.heartbeatMs, { relay: name, workers: 0 })
    let asWorker: { scope: Scope.Closeable; hb: HeartbeatHandle } | undefined
    const syncPresence = Effect.gen(function* () {
      own.setInfo({ relay: name, workers: state.members.size, combined: state.stats.combined })
      if (state.members.size > 0 && !asWorker) {
        const scope = yield* Scope.make()
        const hb = yield* runHeartbeat(s, "worker", id, job.train.heartbeatMs, { relayFor: name }).pipe(Scope.provide(scope))
        asWorker = { scope, hb }
        yield* Effect.logInfo(`relay ${name}: has workers [${[...state.members].sort()}]; joins the job as ${id}`)
      } else if (state.members.size === 0 && asWorker) {
        yield* Scope.close(asWorker.scope, Exit.void)
        asWorker = undefined
        yield* Effect.logInfo(`relay ${name}: no workers left; leaves the job`)
      }
      asWorker?.hb.setInfo({ relayFor: name, workers: state.members.size, version: state.newest })
    })
    yield* Effect.addFinalizer(() => (asWorker ? Scope.close(asWorker.scope, Exit.void) : Effect.void))

    // ---- effects
    const perform = (e: RelayEffect): Effect.Effect<void> => {
      switch (e._tag) {
        case "Forward":
          return sendBundle(bus, s.psPush(e.shard, id), e.bundle).pipe(
            Effect.tap(() => (!e.resend && e.shard === 0 && senderState.due(e.bundle.meta.version) ? save(e.bundle.meta.version) : Effect.void)),
            Effect.asVoid,
            Effect.catch((err) => Effect.logWarning(`relay ${name}: forward to shard ${e.shard} failed (${err.message}); it is resent`))
          )
        case "AckWorker":
          return bus.publish(s.relayAck(name, e.ack.shard, e.worker), encodeMessage(e.ack)).pipe(Effect.ignore)
        case "RefuseWorker":
          return bus.publish(s.relayAck(name, e.shard, e.worker), encodeMessage(rejected(e.rejected))).pipe(Effect.ignore)
        case "Log":
          return e.level === "warn" ? Effect.logWarning(`relay ${name}: ${e.message}`) : Effect.logInfo(`relay ${name}: ${e.message}`)
      }
    }
    yield* Effect.forkScoped(
      Effect.gen(function* () {
        for (;;) {
          const e = yield* Queue.take(queue)
          state.now = e._tag === "Tick" ? e.now : Date.now()
          for (const x of step(state, e)) yield* perform(x)
          if (e._tag === "MemberJoined" || e._tag === "MemberLeft" || e._tag === "Tick") yield* syncPresence
        }
      }).pipe(Effect.catchCause((c) => Effect.logError(`relay ${name}: mailbox ended`, c)), Effect.ensuring(Deferred.succeed(finished, undefined)))
    )
    yield* Effect.forkScoped(Effect.forever(Effect.sleep(TICK_MS).pipe(Effect.andThen(Effect.suspend(() => offer({ _tag: "Tick", now: Date.now() }))))))
    yield* Effect.logInfo(`relay ${name}: serving ${s.relayPushAll(name)} for job ${job.job} (${job.topology.psShards} shards, ${state.sync ? "sync: one combination per version" : "each gradient on its own"})`)
    return { finished, state } satisfies RelayHandle
  })
