/**
 * Implements: how an actor hears accepted control commands — `onControl(s, handlers)`
 * subscribes to the job's `events.control` and calls the actor's hook for each
 * `ControlApplied` verb it handles, once per command and in the order accepted, though
 * events may be lost or repeated (`advance`, the controller's replay); `stopRequested(s)`
 * is a Deferred that completes on `stop` (what `flotilla launch` waits on to exit cleanly).
 * Trusts nothing it hears: an event takes effect only when it decodes, claims a controller
 * as `by` (`<scheduler-id>-controller`), carries the verb's command for this job, passes
 * the controller's own stateless checks (shared/protocol/control-check.ts: an LR in
 * [0, MAX_LR], a schedule that resolves, …), and its seq and epoch are plausible (not
 * MAX_SEQ_AHEAD past the cursor, no epoch from the future). Anything else is refused on
 * the job's `errors` (once per process, naming its sender) and does not move the cursor.
 * Without NATS permissions a client that knows the id pattern can still claim it: only
 * the server's permissions (the controller's user alone may publish on events.control)
 * make `by` true.
 * Does not own: validating requests (the controller), what an actor does on a verb.
 */
import { Deferred, Effect, Result, Scope } from "effect"
import { Bus } from "../bus/Bus.ts"
import { ControlApplied, type CommandVerb, type ControlRequestOf } from "../protocol/control.ts"
import { eventProblem, type CommandProblem } from "../protocol/control-check.ts"
import { decodeBytes, parseJson } from "../protocol/decode.ts"
import type { Subjects } from "../protocol/subjects.ts"
import { makeReporter } from "./report.ts"

export type ControlHandlers = {
  readonly [V in CommandVerb]?: (command: ControlRequestOf<V>, event: ControlApplied) => Effect.Effect<void, unknown>
}

/**
 * The order in which a listener applies control events: each command once, in `seq` order,
 * although core NATS may lose or repeat them (the controller re-broadcasts its recent ones).
 * A gap waits for the repeat that fills it; one older than the controller's replay window is
 * skipped after GAP_GIVE_UP_MS. A listener that starts mid-job takes the replay's newest seq
 * as its starting point (what happened before it started is not replayed to it). Pure.
 */
export interface ControlCursor {
  epoch: number
  seq: number
  readonly pending: Map<number, { ev: ControlApplied; since: number }>
}

export const GAP_GIVE_UP_MS = 10_000

/** An event this far past the cursor's seq is refused: a controller accepts commands one by one, and a listener misses at most a few. */
export const MAX_SEQ_AHEAD = 1_024
/** An epoch is a controller's start time (ms), or 0: one more than a day ahead of this clock is refused. */
const EPOCH_SKEW_MS = 86_400_000

/** Why an event that passed `eventProblem` still cannot be ordered by `cursor`, or undefined. */
export const orderProblem = (cursor: ControlCursor | undefined, ev: ControlApplied, now: number): string | undefined => {
  const epoch = ev.epoch ?? 0
  if (epoch > now + EPOCH_SKEW_MS) return `control event #${ev.seq}: epoch ${epoch} is a start time in the future`
  if (ev.latest !== undefined && (ev.latest < ev.seq || ev.latest > ev.seq + MAX_SEQ_AHEAD)) return `control event #${ev.seq}: latest ${ev.latest} is not within [${ev.seq}, ${ev.seq + MAX_SEQ_AHEAD}] (a replay repeats the controller's newest commands)`
  const from = cursor && cursor.epoch === epoch ? cursor.seq : undefined
  if (from !== undefined && ev.seq > from + MAX_SEQ_AHEAD) return `control event #${ev.seq} is ${ev.seq - from} commands past the last one applied here (#${from}); at most ${MAX_SEQ_AHEAD}`
  return undefined
}

/** Refusals already reported by this process (every listener of a process hears the same event). */
const reported = new Set<string>()
const firstReport = (key: string): boolean => {
  if (reported.has(key)) return false
  if (reported.size >= 4_096) reported.delete(reported.values().next().value!)
  reported.add(key)
  return true
}

/** The events to apply now, in order, for `ev` arriving at `now` (the cursor is updated). */
export const advance = (cursor: ControlCursor | undefined, ev: ControlApplied, now: number): { cursor: ControlCursor | undefined; apply: ControlApplied[] } => {
  const epoch = ev.epoch ?? 0
  if (!cursor || cursor.epoch !== epoch) {
    if (ev.replayed === true) return { cursor: { epoch, seq: ev.latest ?? ev.seq, pending: new Map() }, apply: [] }
    cursor = { epoch, seq: ev.seq - 1, pending: new Map() }
  }
  if (ev.seq > cursor.seq && !cursor.pending.has(ev.seq)) cursor.pending.set(ev.seq, { ev, since: now })
  const apply: ControlApplied[] = []
  while (cursor.pending.size > 0) {
    const next = cursor.pending.get(cursor.seq + 1)
    if (next) {
      cursor.pending.delete(cursor.seq + 1)
      cursor.seq++
      apply.push(next.ev)
      continue
    }
    const oldest = Math.min(...cursor.pending.keys())
    if (now - cursor.pending.get(oldest)!.since < GAP_GIVE_UP_MS) break
    cursor.seq = oldest - 1 // the missing ones are beyond the replay window: go on without them
  }
  return { cursor, apply }
}

/**
 * Call `handlers[verb]` for every accepted command of this job: once each, in the order
 * accepted. `id` names this actor in the refusals it reports.
 */
export const onControl = (s: Subjects, handlers: ControlHandlers, id = "control-listener"): Effect.Effect<void, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const job = s.prefix.slice("flotilla.".length)
    const reject = makeReporter(bus, s, id)
    const refuse = (key: string, p: CommandProblem, sender: string | undefined, messageId?: string) =>
      firstReport(key) ? reject({ code: p.code, reason: p.reason, subject: s.controlApplied, ...(sender !== undefined ? { sender } : {}), ...(messageId !== undefined ? { messageId } : {}) }).pipe(Effect.asVoid) : Effect.void
    // only this subscription's fiber touches it (a subscription's handlers run one at a time)
    let cursor: ControlCursor | undefined
    yield* bus
      .subscribe(s.controlApplied, (m) => {
        const r = decodeBytes(ControlApplied, m.subject, m.data)
        if (Result.isFailure(r)) {
          const raw = parseJson(m.data)
          const claimed = Result.isSuccess(raw) && typeof raw.success === "object" && raw.success !== null ? (raw.success as { sender?: unknown }).sender : undefined
          const sender = typeof claimed === "string" && claimed.length <= 64 ? claimed : undefined
          return refuse(`bad:${new TextDecoder().decode(m.data.subarray(0, 256))}`, { code: "bad-message", reason: `a control event that does not decode: ${r.failure.reason}` }, sender)
        }
        const ev = r.success
        const key = `${ev.epoch ?? 0}:${ev.seq}:${ev.by}:${ev.verb}:${ev.requestId}:${ev.sender}`
        const bad = eventProblem(ev, job)
        if (bad !== undefined) return refuse(key, bad, ev.sender, String(ev.seq))
        const now = Date.now()
        const out = orderProblem(cursor, ev, now)
        if (out !== undefined) return refuse(key, { code: "invalid-value", reason: out }, ev.sender, String(ev.seq))
        const step = advance(cursor, ev, now)
        cursor = step.cursor
        return Effect.forEach(step.apply, (ev) => {
          const handler = handlers[ev.verb] as ((c: unknown, e: ControlApplied) => Effect.Effect<void, unknown>) | undefined
          if (!handler) return Effect.void
          return handler(ev.command, ev).pipe(
            Effect.catchCause((c) => Effect.logError(`control ${ev.verb} (#${ev.seq} from ${ev.sender}) failed here`, c))
          )
        }, { discard: true })
      })
      .pipe(Effect.orDie)
  })

/** Completes with the `stop` event when the job is told to stop. */
export const stopRequested = (s: Subjects, id?: string): Effect.Effect<Deferred.Deferred<ControlApplied>, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const stopped = yield* Deferred.make<ControlApplied>()
    yield* onControl(s, { stop: (_, ev) => Deferred.succeed(stopped, ev) }, id)
    return stopped
  })
