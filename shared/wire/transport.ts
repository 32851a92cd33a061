// Implements: moving tensor bundles over the `Bus` — send (encode, frame, publish),
// receive (subscribe, reassemble, decode, deliver each complete bundle once, report every
// failure), and the two request/reply shapes that need more than one frame.
// Does not own: the byte layout (tensor.ts), framing and its checks (frames.ts), the bus
// itself (shared/bus), subject names (shared/protocol/subjects.ts).
//
// Three ways a bundle travels (header names are frames.ts's `H` plus `T` below):
//
// 1. Publish (fan-out, or one plain subscriber): `sendBundle` publishes every frame on the
//    subject; every subscriber reassembles. Right for `ps.<k>.version` broadcasts.
//
// 2. Claim (the subject is served by a queue group): NATS would scatter a multi-frame
//    message over the members, so the sender first asks for one member:
//      sender   → request on <subject>, empty data, headers Flotilla-Wire, Flotilla-Claim:
//                 <id>, Flotilla-Total, Flotilla-Chunks (+ the caller's, e.g. traceparent)
//      member   → reply, empty data, Flotilla-Inbox: <its private inbox subject>
//                 (or Flotilla-Error: "<reason>: <text>" when it refuses, e.g. over-budget)
//      sender   → publishes the frames (Flotilla-Id = the claimed id) on that inbox.
//    `sendBundle(..., { claim: true })` does the sender's part; `receiveBundles` always
//    answers claims, with or without a queue group. Right for `ps.<k>.push`.
//
// 3. Request a bundle (params pull): the reply may be many frames, so it cannot be the
//    NATS reply itself:
//      requester → subscribes a fresh inbox, then requests on <subject> with its own data
//                  and header Flotilla-Inbox: <inbox>
//      responder → `replyWithBundle`: replies with empty data and Flotilla-Id, -Chunks,
//                  -Total of the bundle, then publishes the frames on the inbox.
//                  Any other reply (no Flotilla-Id, e.g. a JSON `Rejected`) is the
//                  responder's answer and `requestBundle` fails with `BundleReplyError`
//                  carrying it.
//
// Headers the caller passes (traceparent, tracestate, ...) ride on every frame and on
// claim/request messages; the receiver gets frame 0's headers with the bundle.
//
// Memory: the sender encodes into a pooled buffer and returns it to the pool after a bus
// flush succeeded (awaited with `flush: true`, else run in the background); a receiver
// owns each bundle's buffer unless it subscribes with `borrow: true` (views valid during
// onBundle only). Fresh multi-MB buffers cost page faults that dominate on busy hosts.

import { Clock, Data, Deferred, Effect, Exit, Result, Scope } from "effect"
import type { BusError, BusMessage, BusShape, Headers, Subscription } from "../bus/Bus.ts"
import { decodeUtf8 } from "../bus/Bus.ts"
import { HEADERS } from "../protocol/headers.ts"
import { BufferPool, FRAME_PROTOCOL_VERSION, frameMessage, H, newMessageId, Reassembler, WireFrameError } from "./frames.ts"
import type { Frame, ReassembledMessage, ReassemblerOptions } from "./frames.ts"
import { decodeBundle, encodeBundle, manifestToJson, WireDecodeError } from "./tensor.ts"
import type { TensorBundle, WireEncodeError } from "./tensor.ts"

export const T = {
  claim: HEADERS.claim,
  inbox: HEADERS.inbox,
  error: HEADERS.error
} as const

export const DEFAULT_INBOX_PREFIX = "_INBOX.flotilla"
const EMPTY = new Uint8Array(0)

/** Payload buffers of sent bundles, recycled once a flush proved the bus is done with them. */
const sendPool = new BufferPool()

/** The responder answered a bundle request with something other than a bundle. */
export class BundleReplyError extends Data.TaggedError("BundleReplyError")<{
  readonly subject: string
  readonly reply: BusMessage
  readonly message: string
}> {}

export interface SendOptions {
  /** Copied onto every frame (traceparent, ...). */
  readonly headers?: Headers
  /**
   * Wait until the server has every frame (one round trip). Default false: the flush runs
   * in the background, only to recycle the payload buffer once the bus is done with it.
   */
  readonly flush?: boolean
  /** Bytes kept free under maxPayload per frame. Default frames.ts DEFAULT_HEADROOM. */
  readonly headroom?: number
  /** The subject is served by a queue group: claim one member first (see the top). */
  readonly claim?: boolean
  /** Claim request timeout. Default the bus's request default. */
  readonly timeoutMs?: number
  /** Message id; default newMessageId(meta.sender). */
  readonly id?: string
}

export interface SentBundle {
  readonly id: string
  /** Where the frames went (the subject, or the claiming member's inbox). */
  readonly to: string
  readonly bytes: number
  readonly frames: number
}

export interface BundleInfo {
  readonly id: string
  /** the subscription's subject (a pattern, e.g. `….ps.*.version`) */
  readonly subject: string
  /** the subject the message's frames came on (its last frame's): a broadcast's own, or a claim's inbox */
  readonly from: string
  /** Frame 0's headers. */
  readonly headers: Headers
  readonly bytes: number
  readonly chunks: number
}

export type ReceiveError = WireFrameError | WireDecodeError

export interface ReceiveOptions extends ReassemblerOptions {
  readonly queue?: string
  /** Every rejected frame, failed message and timeout. Default: a warning in the log. */
  readonly onError?: (e: ReceiveError, info: { readonly id: string | undefined; readonly subject: string }) => Effect.Effect<void>
  /** Prefix of the private inbox claims are answered with. Default DEFAULT_INBOX_PREFIX. */
  readonly inboxPrefix?: string
  /**
   * The bundle's tensors are views into a buffer that is reused once `onBundle` completes:
   * copy what you keep. Saves a fresh allocation per bundle (e.g. a parameter server that
   * adds gradients into its own accumulators). Default false: the bundle is yours.
   */
  readonly borrow?: boolean
}

const randomToken = (): string => Math.random().toString(36).slice(2, 12) + Date.now().toString(36)

const toFrames = (bundle: TensorBundle, id: string, maxPayload: number, opts: SendOptions) =>
  Effect.gen(function*() {
    const { manifest, payload } = yield* Effect.fromResult(encodeBundle(bundle, sendPool.take))
    const frames = yield* Effect.fromResult(
      frameMessage(payload, { id, maxPayload, headroom: opts.headroom, manifest: manifestToJson(manifest), headers: opts.headers })
    )
    return { frames, payload, bytes: payload.length }
  })

/**
 * Publish the frames. Once a flush succeeded no bus holds views of the payload any more
 * (nats.js has written them to the socket; the in-process bus copies on publish), so the
 * buffer goes back to the pool; if the flush fails it is left to the GC.
 */
const publishFrames = (bus: BusShape, to: string, frames: ReadonlyArray<Frame>, payload: Uint8Array, flush: boolean | undefined) =>
  Effect.gen(function*() {
    for (const f of frames) yield* bus.publish(to, f.data, { headers: f.headers, borrowed: true })
    const recycle = bus.flush().pipe(Effect.andThen(Effect.sync(() => sendPool.give(payload))))
    if (flush === true) yield* recycle
    else yield* Effect.forkDetach(Effect.ignore(recycle))
  })

const replyProblem = (reply: BusMessage): string | undefined => reply.headers[T.error]

/** Encode, frame and publish a bundle on `subject` (or to one claiming member, `claim`). */
export const sendBundle = Effect.fn("wire.sendBundle")(function*(
  bus: BusShape,
  subject: string,
  bundle: TensorBundle,
  opts: SendOptions = {}
): Effect.fn.Return<SentBundle, WireEncodeError | WireFrameError | BusError> {
  const id = opts.id ?? newMessageId(bundle.meta.sender)
  const { frames, payload, bytes } = yield* toFrames(bundle, id, bus.maxPayload, opts)
  let to = subject
  if (opts.claim === true) {
    const reply = yield* bus.request(subject, EMPTY, {
      timeoutMs: opts.timeoutMs,
      headers: {
        ...opts.headers,
        [H.wire]: FRAME_PROTOCOL_VERSION,
        [T.claim]: id,
        [H.total]: String(bytes),
        [H.chunks]: String(frames.length)
      }
    })
    const inbox = reply.headers[T.inbox]
    if (inbox === undefined) {
      return yield* new WireFrameError({ reason: "refused", id, message: `claim on ${subject} refused: ${replyProblem(reply) ?? "no Flotilla-Inbox in the reply"}` })
    }
    to = inbox
  }
  yield* publishFrames(bus, to, frames, payload, opts.flush)
  return { id, to, bytes, frames: frames.length }
})

const defaultOnError = (e: ReceiveError, info: { readonly id: string | undefined; readonly subject: string }) =>
  Effect.logWarning(`wire: ${e.reason}: ${e.message}`).pipe(
    Effect.annotateLogs({ subject: info.subject, messageId: info.id ?? "" })
  )

/** Decode a reassembled message; its manifest is required. */
const decodeMessage = (m: ReassembledMessage): Result.Result<TensorBundle, WireDecodeError> =>
  m.manifest === undefined
    ? Result.fail(new WireDecodeError({ reason: "missing-manifest", message: `message ${m.id}: frame 0 has no ${H.manifest}` }))
    : decodeBundle(m.manifest, m.payload)

/**
 * Subscribe to `subject` (in `queue` when given) and to a private inbox for claims, and
 * call `onBundle` once per complete, valid bundle. Incomplete messages time out after
 * `timeoutMs` without progress (checked every timeoutMs/4, from Effect's clock).
 * Closing the scope (or `unsubscribe`) stops both subscriptions and the sweeper.
 */
export const receiveBundles = (
  bus: BusShape,
  subject: string,
  onBundle: (bundle: TensorBundle, info: BundleInfo) => Effect.Effect<void, unknown>,
  opts: ReceiveOptions = {}
): Effect.Effect<Subscription, BusError, Scope.Scope> =>
  Effect.gen(function*() {
    const pool = opts.borrow === true ? new BufferPool(2) : undefined
    const reassembler = new Reassembler({ ...opts, alloc: pool?.take })
    const onError = opts.onError ?? defaultOnError
    const inbox = `${opts.inboxPrefix ?? DEFAULT_INBOX_PREFIX}.${randomToken()}`
    const report = (e: ReceiveError, id: string | undefined) => onError(e, { id, subject })

    const onFrame = (m: BusMessage) =>
      Effect.gen(function*() {
        if (m.headers[T.claim] !== undefined) return yield* answerClaim(m)
        const now = yield* Clock.currentTimeMillis
        const r = reassembler.accept(m.headers, m.data, now)
        if (r._tag === "Rejected") return yield* report(r.error, r.error.id)
        if (r._tag !== "Complete") return
        const decoded = decodeMessage(r.message)
        if (Result.isFailure(decoded)) return yield* report(decoded.failure, r.message.id)
        const { id, headers, payload, chunks } = r.message
        const delivered = onBundle(decoded.success, { id, subject, from: m.subject, headers, bytes: payload.length, chunks })
        yield* pool === undefined ? delivered : Effect.ensuring(delivered, Effect.sync(() => pool.give(payload)))
      })

    const answerClaim = (m: BusMessage) => {
      const id = m.headers[T.claim]!
      const total = Number(m.headers[H.total])
      const chunks = Number(m.headers[H.chunks] ?? 1)
      const refuse = (reason: string, text: string) => bus.respond(m, EMPTY, { [T.error]: `${reason}: ${text}` })
      if (!(Number.isSafeInteger(total) && total >= 0 && Number.isSafeInteger(chunks) && chunks >= 1)) return refuse("bad-header", `claim ${id}: ${H.total} ${m.headers[H.total]}, ${H.chunks} ${m.headers[H.chunks]}`)
      // the same budget the frames will be charged to (its sender's quota, its pool)
      const over = reassembler.budgetProblem(id, total, chunks)
      if (over !== undefined) return refuse(over.reason, over.message)
      return bus.respond(m, EMPTY, { [T.inbox]: inbox, [H.id]: id })
    }

    const sweep = Effect.gen(function*() {
      const every = Math.min(5_000, Math.max(50, reassembler.timeoutMs / 4))
      while (true) {
        yield* Effect.sleep(every)
        const now = yield* Clock.currentTimeMillis
        for (const e of reassembler.sweep(now)) yield* report(e, e.id)
      }
    })

    const parent = yield* Effect.scope
    const scope = yield* Scope.fork(parent)
    yield* Scope.provide(scope)(
      Effect.gen(function*() {
        yield* bus.subscribe(subject, onFrame, opts.queue === undefined ? undefined : { queue: opts.queue })
        yield* bus.subscribe(inbox, onFrame)
        yield* Effect.forkScoped(sweep)
      })
    ).pipe(Effect.onError(() => Scope.close(scope, Exit.void)))
    return { subject, unsubscribe: Scope.close(scope, Exit.void) }
  })

export interface RequestBundleOptions extends ReassemblerOptions {
  /** Headers of the request (traceparent, ...). */
  readonly headers?: Headers
  /** For the reply and, again, for its frames. Default 5 s. */
  readonly timeoutMs?: number
  readonly inboxPrefix?: string
}

export interface ReceivedBundle {
  readonly bundle: TensorBundle
  readonly info: BundleInfo
  /** The responder's small reply (Flotilla-Id, -Chunks, -Total). */
  readonly reply: BusMessage
}

/** Request on `subject` and receive the (chunked) bundle the responder sends back. */
export const requestBundle = Effect.fn("wire.requestBundle")(function*(
  bus: BusShape,
  subject: string,
  data: Uint8Array,
  opts: RequestBundleOptions = {}
): Effect.fn.Return<ReceivedBundle, ReceiveError | BundleReplyError | BusError> {
  const timeoutMs = opts.timeoutMs ?? 5_000
  const inbox = `${opts.inboxPrefix ?? DEFAULT_INBOX_PREFIX}.${randomToken()}`
  const reassembler = new Reassembler({ maxOutstandingMessages: 1, ...opts })
  const done = yield* Deferred.make<ReassembledMessage, WireFrameError>()
  return yield* Effect.scoped(Effect.gen(function*() {
    yield* bus.subscribe(inbox, (m) =>
      Effect.gen(function*() {
        const r = reassembler.accept(m.headers, m.data, yield* Clock.currentTimeMillis)
        if (r._tag === "Complete") yield* Deferred.succeed(done, r.message)
        else if (r._tag === "Rejected" && r.error.reason !== "duplicate-chunk") yield* Deferred.fail(done, r.error)
      }))
    const reply = yield* bus.request(subject, data, { timeoutMs, headers: { ...opts.headers, [T.inbox]: inbox } })
    const id = reply.headers[H.id]
    if (id === undefined) {
      const text = replyProblem(reply) ?? (reply.data.length > 0 ? decodeUtf8(reply.data.subarray(0, 512)) : "empty reply")
      return yield* new BundleReplyError({ subject, reply, message: `request on ${subject} answered without a bundle: ${text}` })
    }
    const message = yield* Deferred.await(done).pipe(
      Effect.timeoutOrElse({
        duration: timeoutMs,
        orElse: () =>
          Effect.flatMap(Clock.currentTimeMillis, (now) =>
            Effect.fail(reassembler.sweep(now, true)[0] ??
              new WireFrameError({ reason: "timeout", id, message: `bundle ${id} from ${subject}: no frame within ${timeoutMs} ms` })))
      })
    )
    if (message.id !== id) {
      return yield* new WireFrameError({ reason: "inconsistent-headers", id, message: `reply announced bundle ${id}, inbox got ${message.id}` })
    }
    const bundle = yield* Effect.fromResult(decodeMessage(message))
    return { bundle, reply, info: { id, subject, from: inbox, headers: message.headers, bytes: message.payload.length, chunks: message.chunks } }
  }))
})

export interface ReplyOptions {
  readonly headers?: Headers
  readonly headroom?: number
  /** As SendOptions.flush. */
  readonly flush?: boolean
}

/** Answer a `requestBundle` request: reply with the bundle's id, then send its frames to the requester's inbox. */
export const replyWithBundle = Effect.fn("wire.replyWithBundle")(function*(
  bus: BusShape,
  request: BusMessage,
  bundle: TensorBundle,
  opts: ReplyOptions = {}
): Effect.fn.Return<SentBundle, WireEncodeError | WireFrameError | BusError> {
  const inbox = request.headers[T.inbox]
  if (inbox === undefined) {
    yield* bus.respond(request, EMPTY, { [T.error]: `bad-header: the request has no ${T.inbox}` })
    return yield* new WireFrameError({ reason: "bad-header", id: undefined, message: `bundle request on ${request.subject} has no ${T.inbox} header` })
  }
  const id = newMessageId(bundle.meta.sender)
  const { frames, payload, bytes } = yield* toFrames(bundle, id, bus.maxPayload, opts)
  yield* bus.respond(request, EMPTY, { ...opts.headers, [H.id]: id, [H.chunks]: String(frames.length), [H.total]: String(bytes) })
  yield* publishFrames(bus, inbox, frames, payload, opts.flush)
  return { id, to: inbox, bytes, frames: frames.length }
})
