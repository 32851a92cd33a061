/**
 * Implements: the job's control history — every accepted command, who sent it and when —
 * as a store with two backends:
 *   jetstream  a stream `FLOTILLA_<job>_CONTROL` on subject `flotilla.<job>.history`
 *              (file storage, last 10 000 entries), written with `js.publish` and read
 *              back with an ordered consumer; it outlives the controller, so a restarted
 *              controller (or a second one) lists the same history;
 *   memory     the controller's own list (the embedded default, or a server without
 *              JetStream).
 * The Bus does not expose JetStream, so the jetstream store opens its own `nats`
 * connection from the URL (with the controller's credentials), closed with the store's scope.
 * Does not own: validation (controller.ts), the event schema (shared/protocol/control.ts).
 */
import { connect, DeliverPolicy, DiscardPolicy, type JetStreamClient, type JetStreamManager, type NatsConnection } from "nats"
import { Effect, Result, Scope } from "effect"
import { ControlApplied } from "../../shared/protocol/control.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { subjects } from "../../shared/protocol/subjects.ts"
import { natsConnectAuth, type NatsAuth } from "../../shared/bus/nats.ts"

export interface HistoryStore {
  readonly kind: "jetstream" | "memory"
  /** Record an accepted command; returns it with its `seq` (1, 2, ...). */
  append(entry: Omit<ControlApplied, "seq">): Effect.Effect<ControlApplied, Error>
  /** The last `limit` entries, oldest first. */
  list(limit: number): Effect.Effect<ControlApplied[], Error>
}

export const MAX_HISTORY = 10_000

export const memoryHistory = (): HistoryStore => {
  const entries: ControlApplied[] = []
  return {
    kind: "memory",
    append: (e) =>
      Effect.sync(() => {
        const full: ControlApplied = { ...e, seq: entries.length + 1 }
        entries.push(full)
        if (entries.length > MAX_HISTORY) entries.shift()
        return full
      }),
    list: (limit) => Effect.sync(() => entries.slice(-limit))
  }
}

export const historyStreamName = (job: string) => `FLOTILLA_${job}_CONTROL`

const asError = (e: unknown) => (e instanceof Error ? e : new Error(String(e)))

/**
 * The JetStream store on `servers`; fails when JetStream is not enabled there (the
 * caller falls back to memory).
 */
export const jetstreamHistory = (job: string, servers: readonly string[], auth?: NatsAuth): Effect.Effect<HistoryStore, Error, Scope.Scope> =>
  Effect.gen(function* () {
    const subject = subjects(job).history
    const stream = historyStreamName(job)
    const nc: NatsConnection = yield* Effect.acquireRelease(
      Effect.tryPromise({ try: () => connect({ servers: [...servers], name: `flotilla-${job}-history`, maxReconnectAttempts: -1, ...natsConnectAuth(auth) }), catch: asError }),
      (c) => Effect.promise(() => c.drain().catch(() => c.close()))
    )
    const jsm: JetStreamManager = yield* Effect.tryPromise({ try: () => nc.jetstreamManager({ timeout: 3_000 }), catch: asError })
    yield* Effect.tryPromise({
      try: async () => {
        try {
          await jsm.streams.add({ name: stream, subjects: [subject], max_msgs: MAX_HISTORY, discard: DiscardPolicy.Old })
        } catch (e) {
          // created before with another config (or by another controller): use it if it holds our subject
          const info = await jsm.streams.info(stream).catch(() => undefined)
          if (!info?.config.subjects?.includes(subject)) throw e
        }
      },
      catch: (e) => new Error(`JetStream stream ${stream}: ${asError(e).message}`)
    })
    const js: JetStreamClient = nc.jetstream({ timeout: 5_000 })

    const append = (e: Omit<ControlApplied, "seq">) =>
      Effect.tryPromise({ try: () => js.publish(subject, encodeMessage({ ...e, seq: 0 })), catch: asError }).pipe(
        Effect.map((ack): ControlApplied => ({ ...e, seq: ack.seq }))
      )

    const list = (limit: number) =>
      Effect.tryPromise({
        try: async () => {
          const info = await jsm.streams.info(stream)
          const { first_seq: first, last_seq: last, messages } = info.state
          if (messages === 0) return []
          const start = Math.max(first, last - limit + 1)
          const consumer = await js.consumers.get(stream, { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: start })
          const out: ControlApplied[] = []
          const it = await consumer.fetch({ max_messages: last - start + 1, expires: 3_000 })
          for await (const m of it) {
            const r = decodeBytes(ControlApplied, subject, m.data)
            if (Result.isSuccess(r)) out.push({ ...r.success, seq: m.seq })
            if (m.seq >= last) break
          }
          return out
        },
        catch: asError
      })

    return { kind: "jetstream", append, list } satisfies HistoryStore
  })
