/**
 * Implements: the loader's protocol — what it accepts (`LeaseBatch` on `data.lease`,
 * request/reply in the `loader` queue group; `BatchFailed` on `data.ack`), typed
 * constructors for what it sends and is sent, the wire form of a batch reply (payload =
 * tokens as little-endian int32, B × (T + 1); header `Flotilla-Batch` = BatchLeased JSON),
 * and `LoaderClient`, the small client workers and evaluators use. Nobody else builds these
 * messages by hand.
 * Does not own: the schemas (shared/protocol/messages.ts), the lease rules (core.ts).
 */
import { Effect, Result } from "effect"
import type { BusMessage, BusShape, Headers } from "../../shared/bus/Bus.ts"
import { decodeValue, encodeMessage, parseJson } from "../../shared/protocol/decode.ts"
import {
  BatchLeased,
  HEADER_BATCH,
  LeaseReply,
  type BatchFailed,
  type GetAppliedLog,
  type LeaseBatch,
  type NoBatch
} from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, type Subjects } from "../../shared/protocol/subjects.ts"

/** What the loader accepts. */
export type LoaderRequest = LeaseBatch | BatchFailed

// ---------------------------------------------------------------- constructors

export const leaseBatch = (worker: string, split: "train" | "val", index?: number): LeaseBatch =>
  index === undefined ? { _tag: "LeaseBatch", v: PROTOCOL_VERSION, worker, split } : { _tag: "LeaseBatch", v: PROTOCOL_VERSION, worker, split, index }

export const batchFailed = (worker: string, batchId: string, gen: number, reason: string): BatchFailed => ({
  _tag: "BatchFailed",
  v: PROTOCOL_VERSION,
  worker,
  batchId,
  gen,
  reason
})

export const noBatch = (reason: NoBatch["reason"], retryAfterMs: number): NoBatch => ({ _tag: "NoBatch", v: PROTOCOL_VERSION, reason, retryAfterMs })

export const getAppliedLog = (from: string): GetAppliedLog => ({ _tag: "GetAppliedLog", v: PROTOCOL_VERSION, from })

/** The reply that carries a batch: the tokens' bytes and the BatchLeased header. */
export const encodeBatch = (meta: BatchLeased, tokens: Int32Array): { readonly data: Uint8Array; readonly headers: Headers } => ({
  // the wire is little-endian; so is every platform Node runs on
  data: new Uint8Array(tokens.buffer, tokens.byteOffset, tokens.byteLength),
  headers: { [HEADER_BATCH]: JSON.stringify(meta) }
})

// ---------------------------------------------------------------- the client

export type LeaseResult =
  | { readonly _tag: "Batch"; readonly meta: BatchLeased; readonly tokens: Int32Array }
  | { readonly _tag: "NoBatch"; readonly reason: string; readonly retryAfterMs: number }
  | { readonly _tag: "Failed"; readonly reason: string }

const textEncoder = new TextEncoder()

/** A lease reply as a LeaseResult: a batch, a NoBatch, or why it is neither. */
export const decodeBatch = (m: BusMessage): LeaseResult => {
  const h = m.headers[HEADER_BATCH]
  if (h === undefined) {
    const j = parseJson(m.data)
    if (Result.isFailure(j)) return { _tag: "Failed", reason: j.failure }
    const r = decodeValue(LeaseReply, m.subject, j.success)
    if (Result.isFailure(r)) return { _tag: "Failed", reason: r.failure.reason }
    return r.success._tag === "NoBatch"
      ? { _tag: "NoBatch", reason: r.success.reason, retryAfterMs: r.success.retryAfterMs }
      : { _tag: "Failed", reason: `rejected (${r.success.code}): ${r.success.reason}` }
  }
  const meta = parseJson(textEncoder.encode(h))
  if (Result.isFailure(meta)) return { _tag: "Failed", reason: `${HEADER_BATCH} header: ${meta.failure}` }
  const d = decodeValue(BatchLeased, m.subject, meta.success)
  if (Result.isFailure(d)) return { _tag: "Failed", reason: `${HEADER_BATCH} header: ${d.failure.reason}` }
  const need = d.success.B * (d.success.T + 1) * 4
  if (m.data.byteLength !== need) return { _tag: "Failed", reason: `batch payload is ${m.data.byteLength} bytes, expected ${need}` }
  const tokens = new Int32Array(d.success.B * (d.success.T + 1))
  new Uint8Array(tokens.buffer).set(m.data)
  return { _tag: "Batch", meta: d.success, tokens }
}

export const LoaderClient = {
  /** Lease the next train batch (or val batch `index`). Never fails: a failure is `Failed`. */
  lease: (bus: BusShape, s: Subjects, worker: string, split: "train" | "val", index?: number, timeoutMs = 5_000): Effect.Effect<LeaseResult> =>
    bus.request(s.dataLease, encodeMessage(leaseBatch(worker, split, index)), { timeoutMs }).pipe(
      Effect.map(decodeBatch),
      Effect.catch((e) => Effect.succeed<LeaseResult>({ _tag: "Failed", reason: `${e._tag}: ${e.message}` }))
    ),
  /** Give a leased batch back (failed, or its gradient is known stale). Never fails. */
  fail: (bus: BusShape, s: Subjects, worker: string, batchId: string, gen: number, reason: string): Effect.Effect<void> =>
    bus.publish(s.dataAck, encodeMessage(batchFailed(worker, batchId, gen, reason))).pipe(
      Effect.catch((e) => Effect.logWarning(`${worker}: BatchFailed for ${batchId} not sent: ${e.message}`))
    )
}
