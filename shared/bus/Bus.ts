// Implements: the `Bus` service — what every actor uses to talk: publish, subscribe (plain
// or in a queue group), request/reply, respond, flush — with its typed errors, the
// subscription runner both implementations share (sequential handlers, drain on close),
// and two tiny byte helpers.
// Does not own: transports (shared/bus/nats.ts, shared/bus/inprocess.ts), subject names
// (the subjects module), message schemas (shared/protocol), tracing of messages.
//
// Semantics every implementation keeps (test/bus.contract.test.ts checks them):
//   - `*` matches one token, `>` one or more trailing tokens; wildcards only in subscribe;
//   - a queue group gets each message exactly once (one member), plain subscribers all;
//   - handlers of one subscription run one at a time, in arrival order, in a fiber owned by
//     the scope `subscribe` ran in; a handler that fails or dies is logged (with the
//     subject) and the subscription keeps going;
//   - closing that scope (or `unsubscribe`) stops delivery, lets the in-flight handler and
//     the messages already received finish (drain), then ends the fiber;
//   - header keys are case-sensitive as given; values are strings (NATS trims surrounding
//     whitespace and forbids CR/LF; keys may not hold ':' or whitespace);
//   - `maxPayload` counts data plus encoded headers, as nats-server does;
//   - received `data` may be shared between subscribers of one message: treat it as
//     read-only (copy before mutating).
import type * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Queue from "effect/Queue"
import * as Scope from "effect/Scope"

export type Headers = Readonly<Record<string, string>>

export interface BusMessage {
  readonly subject: string
  readonly data: Uint8Array
  readonly headers: Headers
  readonly reply?: string
}

export interface Subscription {
  readonly subject: string
  /** Same as closing the subscription's scope: stop delivery, drain, end the fiber. Idempotent. */
  readonly unsubscribe: Effect.Effect<void>
}

/** A request got no reply within its timeout. */
export class BusTimeoutError extends Data.TaggedError("BusTimeoutError")<{
  readonly subject: string
  readonly message: string
  readonly timeoutMs: number
}> {}

/** A request went to a subject nobody subscribes to. */
export class NoRespondersError extends Data.TaggedError("NoRespondersError")<{
  readonly subject: string
  readonly message: string
}> {}

/** A message (data plus encoded headers) is larger than the bus's `maxPayload`. */
export class MaxPayloadExceededError extends Data.TaggedError("MaxPayloadExceededError")<{
  readonly subject: string
  readonly message: string
  readonly size: number
  readonly maxPayload: number
}> {}

/** The connection is closed, draining, or failed to open; or the transport threw. */
export class BusConnectionError extends Data.TaggedError("BusConnectionError")<{
  readonly subject: string
  readonly message: string
  readonly cause?: unknown
}> {}

/** The call itself is malformed: an invalid subject, header key or header value. */
export class BusArgumentError extends Data.TaggedError("BusArgumentError")<{
  readonly subject: string
  readonly message: string
}> {}

export type BusError =
  | BusTimeoutError
  | NoRespondersError
  | MaxPayloadExceededError
  | BusConnectionError
  | BusArgumentError

export interface PublishOptions {
  readonly headers?: Headers
  readonly reply?: string
  /**
   * The caller promises not to change `data` until the next `flush()` completes, so the
   * bus may send it without copying (NATS holds a reference until it flushes). The wire
   * transport sets it for tensor frames, whose buffers it reuses only after a flush.
   */
  readonly borrowed?: boolean
}

export interface SubscribeOptions {
  /** Queue group: each message goes to exactly one member of the group. */
  readonly queue?: string
  /**
   * Most messages and bytes waiting for the handler (default SUBSCRIPTION_LIMITS). Past
   * either, new messages are dropped (and counted in one warning a second), as nats-server
   * drops a slow consumer's: delivery is at most once anyway, and the protocol recovers a
   * lost message (docs/PROTOCOL.md); memory never grows without bound.
   */
  readonly limits?: { readonly messages: number; readonly bytes: number }
}

export interface RequestOptions {
  /** Default DEFAULT_REQUEST_TIMEOUT_MS. */
  readonly timeoutMs?: number
  readonly headers?: Headers
}

export interface BusShape {
  readonly kind: "nats" | "in-process"
  /** Largest message (data + encoded headers) in bytes: nats-server's INFO max_payload, or configured. */
  readonly maxPayload: number
  publish(subject: string, data: Uint8Array, opts?: PublishOptions): Effect.Effect<void, BusError>
  subscribe(
    subject: string,
    handler: (m: BusMessage) => Effect.Effect<void, unknown>,
    opts?: SubscribeOptions
  ): Effect.Effect<Subscription, BusError, Scope.Scope>
  request(
    subject: string,
    data: Uint8Array,
    opts?: RequestOptions
  ): Effect.Effect<BusMessage, BusTimeoutError | NoRespondersError | BusError>
  /** Publishes to `to.reply`; a no-op when the message has no reply subject. */
  respond(to: BusMessage, data: Uint8Array, headers?: Headers): Effect.Effect<void, BusError>
  /** Resolves once everything published so far reached the server (in-process: at once). */
  flush(): Effect.Effect<void, BusError>
}

export class Bus extends Context.Service<Bus, BusShape>()("flotilla/shared/bus/Bus") {}

/** Defaults, in one place. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 5_000
export const DEFAULT_IN_PROCESS_MAX_PAYLOAD = 1024 * 1024 // nats-server's default
/** Default bound of one subscription's queue (see SubscribeOptions.limits). */
export const SUBSCRIPTION_LIMITS = { messages: 65_536, bytes: 512 * 1024 * 1024 } as const

/** How long closing a subscription waits for its handlers to drain before interrupting them. */
export const DRAIN_TIMEOUT_MS = 30_000

export const EMPTY_HEADERS: Headers = Object.freeze({})

const textEncoder = new TextEncoder()
const textDecoder = new TextDecoder()

export const encodeJson = (value: unknown): Uint8Array => textEncoder.encode(JSON.stringify(value))
export const encodeUtf8 = (text: string): Uint8Array => textEncoder.encode(text)
export const decodeUtf8 = (bytes: Uint8Array): string => textDecoder.decode(bytes)

// ---------------------------------------------------------------------------------------
// For implementations: the subscription runner.

/**
 * Runs `handler` over the messages a transport delivers, one at a time, in a fiber owned
 * by a child of the current scope. `attach` registers with the transport, calling
 * `deliver` for each message (synchronously, from any callback), and returns the effect
 * that detaches it: once that effect completes `deliver` is not called again. Closing the
 * scope detaches, lets queued messages drain (bounded by DRAIN_TIMEOUT_MS), then
 * interrupts the fiber.
 */
export const runSubscription = <E>(
  subject: string,
  handler: (m: BusMessage) => Effect.Effect<void, unknown>,
  attach: (deliver: (m: BusMessage) => void) => Effect.Effect<Effect.Effect<void>, E>,
  limits: { readonly messages: number; readonly bytes: number } = SUBSCRIPTION_LIMITS
): Effect.Effect<Subscription, E, Scope.Scope> =>
  Effect.gen(function*() {
    const parent = yield* Effect.scope
    const scope = yield* Scope.fork(parent)
    const queue = yield* Queue.make<BusMessage, Cause.Done>()
    // the queue's bound: counted where messages enter (the transport's callback) and leave
    let queued = 0
    let queuedBytes = 0
    let dropped = 0
    let warnedAt = 0
    const services = yield* Effect.context<never>()
    const handleOne = (m: BusMessage) =>
      Effect.suspend(() => {
        queued--
        queuedBytes -= m.data.byteLength
        return handler(m)
      }).pipe(
        Effect.catchCause((cause) =>
          Effect.logError("bus handler failed; subscription continues", cause).pipe(
            Effect.annotateLogs({ subject: m.subject, subscription: subject })
          )
        )
      )
    const loop = Effect.gen(function*() {
      while (true) {
        const batch = yield* Queue.takeAll(queue)
        for (const m of batch) yield* handleOne(m)
      }
    }).pipe(Effect.catchCause(() => Effect.void)) // Done: the queue ended and is empty
    const fiber = yield* Effect.forkIn(loop, scope)
    const detach = yield* attach((m) => {
      if (queued >= limits.messages || queuedBytes + m.data.byteLength > limits.bytes) {
        dropped++
        const now = Date.now()
        if (now - warnedAt >= 1_000) {
          warnedAt = now
          Effect.runForkWith(services)(
            Effect.logWarning(`bus subscription is behind: ${queued} messages / ${queuedBytes} bytes waiting; dropped ${dropped} so far`).pipe(
              Effect.annotateLogs({ subscription: subject })
            )
          )
        }
        return
      }
      queued++
      queuedBytes += m.data.byteLength
      Queue.offerUnsafe(queue, m)
    }).pipe(Effect.onError(() => Scope.close(scope, Exit.void)))
    // Added after forkIn's finalizer, so it runs first: detach, drain, then interrupt.
    yield* Scope.addFinalizer(
      scope,
      Effect.gen(function*() {
        yield* detach
        yield* Queue.end(queue)
        const drained = yield* Effect.timeoutOption(Fiber.await(fiber), DRAIN_TIMEOUT_MS)
        if (drained._tag === "None") {
          yield* Effect.logWarning(`bus subscription did not drain within ${DRAIN_TIMEOUT_MS} ms; interrupting`).pipe(
            Effect.annotateLogs({ subscription: subject })
          )
        }
      })
    )
    return { subject, unsubscribe: Scope.close(scope, Exit.void) }
  })
