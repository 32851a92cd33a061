/**
 * Implements: the controller — a job's control endpoint. It runs in the scheduler's
 * process (`flotilla launch scheduler`, `flotilla start`) and serves `control.<verb>` in
 * queue group `control`.
 *
 * Every message is decoded and validated before anything changes: its size, the verb
 * (the subject's last token), JSON, the verb's schema (no unknown fields), the job, and
 * the values (shared/protocol/control-check.ts: an LR finite in [0, MAX_LR], a schedule
 * that resolves, bounded consistency needs a staleness; the same checks every control
 * listener applies to the broadcast) and against the job's live state (an optimizer patch
 * through setHyperparams). A bad message gets a `ControlRejected` reply naming the problem, goes out
 * on the job's `errors` subject as a `Rejected`, and changes nothing. An accepted command
 * is recorded in the history (actors/controller/history.ts: JetStream on NATS, memory
 * embedded), broadcast as `ControlApplied` on `events.control` (the actors act on it:
 * shared/actor/control-listener.ts), and answered with `ControlAccepted`.
 * `status` is assembled from heartbeats, `ps.*.applied` (a shard's newest incarnation
 * counts, so a restarted server's lower version shows), the scheduler's metrics and an LR
 * request for the next step; `history` lists the store. Its recent commands go out again
 * every REPLAY_MS (events are at most once; listeners apply each once, in order). One
 * mailbox: subscriptions only enqueue, one fiber handles requests and observations in turn.
 * Does not own: applying commands (each actor does), the ctl command line (cli/ctl.ts).
 */
import { Effect, Queue, Result, Scope } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { trackMembership } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { Consistency, JobConfig } from "../../shared/config/job.ts"
import { resolveOptimizer, setHyperparams, type OptimizerConfig, type OptimizerPatch } from "../../shared/optim/optimizers.ts"
import {
  CONTROL_MAX_BYTES,
  CONTROL_VERBS,
  ControlApplied,
  decodeControlRequest,
  isCommandVerb,
  isControlVerb,
  type ControlAccepted,
  type ControlCommand,
  type ControlHistory,
  type ControlRejected,
  type ControlRequest,
  type JobStatus
} from "../../shared/protocol/control.ts"
import { decodeBytes, encodeMessage, parseJson } from "../../shared/protocol/decode.ts"
import { LrForStep, StepApplied, ValidationLoss, type ErrorCode } from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, queues, subjects } from "../../shared/protocol/subjects.ts"
import { resolveSchedule, type Schedule, type ScheduleInput } from "../../shared/schedule/schedules.ts"
import { jetstreamHistory, memoryHistory, type HistoryStore } from "./history.ts"
import type { NatsAuth } from "../../shared/bus/nats.ts"
import { codecName, parseCodec } from "../../shared/wire/codecs.ts"
import { commandProblem, eventProblem } from "../../shared/protocol/control-check.ts"
import { gradCodecAt, withSwitch, type CodecSwitch, type CompressionConfig } from "../../shared/wire/compression.ts"

/** Control events are at-most-once: the newest REPLAY_KEEP accepted commands go out again every REPLAY_MS. */
export const REPLAY_MS = 2_000
export const REPLAY_KEEP = 16

export interface ControllerOptions {
  readonly job: JobConfig
  readonly id: string
  /** NATS servers: keep the history in JetStream there (memory when absent or without JetStream). */
  readonly nats?: readonly string[]
  /** the credentials of that history connection (the scheduler's: shared/bus/permissions.ts). */
  readonly natsAuth?: NatsAuth
}

/** What the controller believes the job is running (the job file plus accepted commands). */
export interface ControlView {
  optimizer: OptimizerConfig
  schedule: Schedule
  consistency: Consistency
  paused: boolean
  stopped: boolean
  /** the job's gradient codec and the accepted switches (shared/wire/compression.ts). */
  compression: { readonly base: CompressionConfig; readonly switches: readonly CodecSwitch[] }
}

export interface ControllerHandle {
  readonly history: HistoryStore
  readonly view: ControlView
}

type Problem = { readonly code: ErrorCode; readonly reason: string }
const problem = (code: ErrorCode, reason: string): Problem => ({ code, reason })

/** Check a decoded command against the live view; returns the view it leads to, or a problem. */
export const validateCommand = (view: ControlView, c: ControlCommand): Result.Result<ControlView, Problem> => {
  // the checks that need no state: the same the control listeners apply to every event (shared/protocol/control-check.ts)
  const pure = commandProblem(c)
  if (pure !== undefined) return Result.fail(pure)
  switch (c._tag) {
    case "PauseJob":
      return Result.succeed({ ...view, paused: true })
    case "ResumeJob":
      return view.stopped ? Result.fail(problem("conflict", "the job was stopped; start it again instead")) : Result.succeed({ ...view, paused: false })
    case "StopJob":
      return Result.succeed({ ...view, stopped: true, paused: true })
    case "CheckpointJob":
    case "SetLr":
      return Result.succeed(view)
    case "SetSchedule": {
      const r = resolveSchedule(c.schedule as unknown as ScheduleInput)
      return Result.isFailure(r) ? Result.fail(problem("invalid-value", r.failure.message)) : Result.succeed({ ...view, schedule: r.success })
    }
    case "SetOptimizer": {
      const r = setHyperparams(view.optimizer, c.patch as OptimizerPatch)
      return Result.isFailure(r) ? Result.fail(problem("invalid-value", r.failure.message)) : Result.succeed({ ...view, optimizer: r.success })
    }
    case "SetConsistency":
      return Result.succeed({ ...view, consistency: c.mode === "bounded" ? { mode: "bounded", staleness: c.staleness ?? 0 } : { mode: c.mode } })
    case "SetCompression": {
      const codec = parseCodec(c.codec)
      if (Result.isFailure(codec) || c.fromVersion === undefined) return Result.fail(problem("invalid-value", "set-compression needs a codec of the registry and fromVersion"))
      const switches = withSwitch(view.compression.switches, { fromVersion: c.fromVersion, codec: codecName(codec.success) })
      return Result.succeed({ ...view, compression: { ...view.compression, switches } })
    }
  }
}

/** Versions a set-compression starts ahead of the job: at least 2, and about 2 s of progress at the rate seen. */
export const compressionLead = (samples: ReadonlyArray<{ readonly version: number; readonly at: number }>): number => {
  if (samples.length < 2) return 2
  const [a, b] = [samples[0], samples[samples.length - 1]]
  const perSec = b.at > a.at ? ((b.version - a.version) * 1000) / (b.at - a.at) : 0
  return 2 + Math.ceil(Math.max(0, perSec) * 2)
}

/** status: the codec at `version` and the next switch, if one is pending. */
const compressionStatus = (view: ControlView, version: number) => {
  const next = view.compression.switches.find((x) => x.fromVersion > version)
  return { codec: gradCodecAt(view.compression.base, view.compression.switches, version), ...(next ? { next } : {}) }
}

const str = (x: unknown, max = 128): string | undefined => (typeof x === "string" && x.length > 0 && x.length <= max ? x : undefined)

export const runController = (o: ControllerOptions): Effect.Effect<ControllerHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const { job, id } = o
    const s = subjects(job.job)
    const reject = makeReporter(bus, s, id)

    const optimizer = resolveOptimizer(job.optimizer as never)
    if (Result.isFailure(optimizer)) return yield* Effect.fail(new Error(`optimizer: ${optimizer.failure.message}`))
    const schedule = resolveSchedule(job.schedule as unknown as ScheduleInput)
    if (Result.isFailure(schedule)) return yield* Effect.fail(new Error(`schedule: ${schedule.failure.message}`))
    const view: ControlView = {
      optimizer: optimizer.success, schedule: schedule.success, consistency: job.train.consistency, paused: false, stopped: false,
      compression: { base: job.train.compression, switches: [] }
    }

    const history: HistoryStore = o.nats
      ? yield* jetstreamHistory(job.job, o.nats, o.natsAuth).pipe(
          Effect.catch((e) =>
            Effect.logWarning(`controller ${id}: no JetStream (${e.message}); keeping the control history in memory`).pipe(Effect.as(memoryHistory()))
          )
        )
      : memoryHistory()
    yield* Effect.logInfo(`controller ${id}: serving ${s.controlAll} (history: ${history.kind})`)
    const epoch = history.kind === "jetstream" ? 0 : Date.now()
    /** the newest accepted commands (this controller's and its peers'), re-broadcast every REPLAY_MS. */
    let recent: ControlApplied[] = []
    const remember = (e: ControlApplied) => {
      if (recent.some((r) => r.seq === e.seq && (r.epoch ?? 0) === (e.epoch ?? 0))) return
      recent = [...recent, e].sort((a, b) => a.seq - b.seq).slice(-REPLAY_KEEP)
    }
    const replay = Effect.suspend(() => {
      const latest = recent.at(-1)?.seq ?? 0
      return Effect.forEach(recent, (e) => bus.publish(s.controlApplied, encodeMessage({ ...e, replayed: true, latest })).pipe(Effect.ignore), { discard: true })
    })

    // ---- what status reports: membership, applied versions, scheduler and evaluator metrics
    const membership = yield* trackMembership(s, job.train.livenessMs)
    const shards = new Map<number, { incarnation: number; version: number }>()
    let lastLoss: number | null = null
    let lastLr: number | null = null
    let lastStep: number | null = null
    let lastValLoss: number | null = null
    let valMetrics: Record<string, number> | undefined
    let epochsDone = 0
    let finished = false
    /** (newest version, when heard) over the last 10 s: how fast the job moves (set-compression's lead). */
    let progress: Array<{ version: number; at: number }> = []
    const onApplied = (m: BusMessage) => {
      const r = decodeBytes(StepApplied, m.subject, m.data)
      if (Result.isFailure(r)) return
      const a = r.success
      const cur = shards.get(a.shard)
      // a newer incarnation (a restart, a rollback) counts from its own version, lower or not
      if (!cur || a.incarnation > cur.incarnation || (a.incarnation === cur.incarnation && a.version > cur.version)) {
        shards.set(a.shard, { incarnation: a.incarnation, version: a.version })
      }
      const at = Date.now()
      if (a.version > (progress.at(-1)?.version ?? -1)) progress = [...progress.filter((p) => at - p.at <= 10_000), { version: a.version, at }]
      lastLoss = Number.isFinite(a.loss) ? a.loss : null
      if (a.shard === 0 && a.epochsDone !== undefined) epochsDone = a.epochsDone
      lastLr = a.lr
      if (a.final) finished = true
    }
    const onMetrics = (m: BusMessage) => {
      const lr = decodeBytes(LrForStep, m.subject, m.data)
      if (Result.isSuccess(lr)) lastStep = lr.success.step
      const val = decodeBytes(ValidationLoss, m.subject, m.data)
      if (Result.isSuccess(val)) {
        lastValLoss = Number.isFinite(val.success.loss) ? val.success.loss : null
        valMetrics = val.success.metrics
      }
    }
    // other controllers of this job (queue group members) keep our view current
    const onPeer = (m: BusMessage) => {
      const r = decodeBytes(ControlApplied, m.subject, m.data)
      // a peer is another controller of this job: what no controller could have issued is not taken in (nor replayed)
      if (Result.isSuccess(r) && r.success.by !== id && r.success.replayed !== true && eventProblem(r.success, job.job) === undefined) {
        const next = validateCommand(view, r.success.command)
        if (Result.isSuccess(next)) Object.assign(view, next.success)
        remember(r.success)
      }
    }

    const version = () => (shards.size < job.topology.psShards ? null : Math.min(...[...shards.values()].map((x) => x.version)))

    const status = (requestId: string) =>
      Effect.gen(function* () {
        const v = version()
        const next = yield* bus
          .request(s.lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step: v ?? 0 }), { timeoutMs: 500 })
          .pipe(
            Effect.flatMap((m) => Effect.fromResult(decodeBytes(LrForStep, m.subject, m.data))),
            Effect.map((r) => r.lr as number | null),
            Effect.catch(() => Effect.succeed(lastLr))
          )
        const now = Date.now()
        const actors = membership
          .all()
          .sort((a, b) => (a.role === b.role ? (a.id < b.id ? -1 : 1) : a.role < b.role ? -1 : 1))
          .map((m) => ({ role: m.role, id: m.id, host: m.host, pid: m.pid, heartbeatAgeMs: Math.max(0, now - m.lastSeen), state: m.state, info: m.info, restarts: m.restarts ?? 0 }))
        const reply: JobStatus = {
          _tag: "JobStatus", v: PROTOCOL_VERSION, job: job.job, requestId, by: id, at: now, actors,
          version: v, shards: [...shards].sort(([a], [b]) => a - b).map(([shard, x]) => ({ shard, version: x.version })),
          step: lastStep, lr: next, schedule: view.schedule.kind, lastLoss, lastValLoss,
          ...(valMetrics ? { valMetrics } : {}), epoch: { done: epochsDone, of: job.train.epochs },
          consistency: view.consistency, compression: compressionStatus(view, v ?? 0), optimizer: { ...view.optimizer }, paused: view.paused, stopped: view.stopped, finished
        }
        return reply
      })

    const refuse = (m: BusMessage, p: Problem, raw: unknown) =>
      Effect.gen(function* () {
        const r = raw as Record<string, unknown> | undefined
        const sender = typeof r === "object" && r !== null ? str(r.sender, 64) : undefined
        const requestId = typeof r === "object" && r !== null ? str(r.requestId) : undefined
        yield* reject({ code: p.code, reason: p.reason, subject: m.subject, sender })
        const reply: ControlRejected = { _tag: "ControlRejected", v: PROTOCOL_VERSION, job: job.job, requestId, code: p.code, reason: p.reason, by: id, at: Date.now() }
        yield* bus.respond(m, encodeMessage(reply)).pipe(Effect.ignore)
      })

    const accept = (m: BusMessage, verb: string, c: ControlCommand, next: ControlView) =>
      Effect.gen(function* () {
        if (!isCommandVerb(verb)) return
        const at = Date.now()
        const entry = yield* history.append({ _tag: "ControlApplied", v: PROTOCOL_VERSION, job: job.job, verb, command: c, sender: c.sender, requestId: c.requestId, by: id, at, epoch })
        Object.assign(view, next)
        remember(entry)
        yield* bus.publish(s.controlApplied, encodeMessage(entry))
        yield* Effect.logInfo(`controller ${id}: #${entry.seq} ${verb} from ${c.sender} accepted`)
        const reply: ControlAccepted = { _tag: "ControlAccepted", v: PROTOCOL_VERSION, job: job.job, requestId: c.requestId, verb, seq: entry.seq, by: id, at }
        yield* bus.respond(m, encodeMessage(reply))
      })

    const serve = Effect.fn("Controller.serve")(function* (m: BusMessage) {
      if (m.data.byteLength > CONTROL_MAX_BYTES) {
        return yield* refuse(m, problem("bad-message", `control message is ${m.data.byteLength} bytes; the limit is ${CONTROL_MAX_BYTES}`), undefined)
      }
      const verb = m.subject.slice(s.prefix.length + ".control.".length)
      if (!isControlVerb(verb)) {
        return yield* refuse(m, problem("unknown-verb", `unknown control verb ${JSON.stringify(verb)}: one of ${CONTROL_VERBS.join(", ")}`), undefined)
      }
      const json = parseJson(m.data)
      if (Result.isFailure(json)) return yield* refuse(m, problem("bad-message", json.failure), undefined)
      const raw = json.success
      if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
        return yield* refuse(m, problem("bad-message", `expected a JSON object (a ${verb} request), got ${Array.isArray(raw) ? "an array" : raw === null ? "null" : typeof raw}`), undefined)
      }
      const claimed = (raw as { job?: unknown }).job
      if (typeof claimed === "string" && claimed !== job.job) {
        return yield* refuse(m, problem("wrong-job", `this is job ${JSON.stringify(job.job)}'s controller; the message is for job ${JSON.stringify(claimed)}`), raw)
      }
      const decoded = decodeControlRequest(verb, m.subject, raw)
      if (Result.isFailure(decoded)) return yield* refuse(m, problem("bad-message", `${verb}: ${decoded.failure.reason}`), raw)
      const req: ControlRequest = decoded.success
      if (req._tag === "GetJobStatus") return yield* bus.respond(m, encodeMessage(yield* status(req.requestId)))
      if (req._tag === "GetControlHistory") {
        const entries = yield* history.list(req.limit ?? 100).pipe(Effect.orDie)
        const reply: ControlHistory = { _tag: "ControlHistory", v: PROTOCOL_VERSION, job: job.job, requestId: req.requestId, by: id, at: Date.now(), store: history.kind, entries }
        return yield* bus.respond(m, encodeMessage(reply))
      }
      let command: ControlCommand = req
      if (req._tag === "SetCompression") {
        // the switch version: one every sender and every shard can still meet (the broadcast carries it)
        const newest = Math.max(-1, ...[...shards.values()].map((x) => x.version))
        if (req.fromVersion !== undefined && req.fromVersion <= newest) {
          return yield* refuse(m, problem("invalid-value", `fromVersion ${req.fromVersion} has passed: the job is at version ${newest}; give a later one, or none`), raw)
        }
        command = { ...req, fromVersion: req.fromVersion ?? Math.max(0, newest) + compressionLead(progress) }
      }
      const next = validateCommand(view, command)
      if (Result.isFailure(next)) return yield* refuse(m, next.failure, raw)
      yield* accept(m, verb, command, next.success).pipe(
        Effect.catch((e) => refuse(m, problem("internal", `could not record the command: ${e.message}`), raw))
      )
    })

    // ---- one mailbox: every subscription only enqueues; this one fiber owns the view and the figures
    type Input = { readonly kind: "request" | "applied" | "metrics" | "peer"; readonly m: BusMessage } | { readonly kind: "replay" }
    const inbox = yield* Queue.unbounded<Input>()
    const enqueue = (kind: Input["kind"]) => (m: BusMessage) => Effect.sync(() => void Queue.offerUnsafe(inbox, { kind, m }))
    yield* Effect.forkScoped(
      Effect.forever(
        Queue.take(inbox).pipe(
          Effect.flatMap((i) =>
            i.kind === "replay" ? replay
            : i.kind === "request" ? serve(i.m)
            : Effect.sync(() => (i.kind === "applied" ? onApplied(i.m) : i.kind === "metrics" ? onMetrics(i.m) : onPeer(i.m)))
          ),
          Effect.catchCause((c) => Effect.logError(`controller ${id}: a message failed`, c))
        )
      )
    )
    yield* Effect.forkScoped(Effect.forever(Effect.sleep(REPLAY_MS).pipe(Effect.andThen(Effect.sync(() => void Queue.offerUnsafe(inbox, { kind: "replay" }))))))
    yield* bus.subscribe(s.psAppliedAll, enqueue("applied"))
    yield* bus.subscribe(s.metricsAll, enqueue("metrics"))
    yield* bus.subscribe(s.controlApplied, enqueue("peer"))
    yield* bus.subscribe(s.controlAll, enqueue("request"), { queue: queues.control })
    return { history, view } satisfies ControllerHandle
  })
