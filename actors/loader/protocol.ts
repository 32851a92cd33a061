/**
 * Implements: the loader's protocol — what it accepts (`LeaseBatch` on `data.lease.<worker>`,
 * request/reply in the `loader` queue group; `BatchFailed` on `data.ack.<worker>`), typed
 * constructors for what it sends and is sent, the wire form of a batch reply (payload = the
 * batch's named tensors as a tensor bundle, its manifest in `Flotilla-Manifest`; header
 * `Flotilla-Batch` = BatchLeased JSON), `getDataInfo` (`data.info`),
 * and `LoaderClient`, the small client workers and evaluators use. Nobody else builds these
 * messages by hand.
 * Does not own: the schemas (shared/protocol/messages.ts), the lease rules (core.ts).
 */
import { Effect, Result } from "effect"
import type { BusMessage, BusShape, Headers } from "../../shared/bus/Bus.ts"
import { decodeBytes, decodeValue, encodeMessage, parseJson } from "../../shared/protocol/decode.ts"
import {
  BatchLeased,
  DataInfo,
  HEADER_BATCH,
  LeaseReply,
  type BatchFailed,
  type FetchBatch,
  type GetAppliedLog,
  type GetDataInfo,
  type LeaseBatch,
  type NoBatch
} from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, type Subjects } from "../../shared/protocol/subjects.ts"
import { HEADERS } from "../../shared/protocol/headers.ts"
import type { Batch } from "../../shared/models/model.ts"
import { decodeBundle, encodeBundle, manifestToJson, type WireTensor } from "../../shared/wire/tensor.ts"

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

export const fetchBatch = (worker: string, batchId: string): FetchBatch => ({ _tag: "FetchBatch", v: PROTOCOL_VERSION, worker, batchId })

export const getDataInfo = (from: string): GetDataInfo => ({ _tag: "GetDataInfo", v: PROTOCOL_VERSION, from })

/** The reply that carries a batch: its tensors as a bundle, the BatchLeased and manifest headers. */
export const encodeBatch = (meta: BatchLeased, batch: Batch): { readonly data: Uint8Array; readonly headers: Headers } => {
  const tensors: WireTensor[] = [...batch.tensors].map(([name, data]) => ({
    name,
    dtype: data instanceof Int32Array ? "int32" : "float32",
    shape: data.length % batch.size === 0 && data.length !== batch.size ? [batch.size, data.length / batch.size] : [data.length],
    data
  }))
  const r = encodeBundle({ tensors, meta: { kind: "batch", job: "", version: 0, step: 0, sender: "loader", batchId: meta.batchId, codec: "f32" } })
  if (Result.isFailure(r)) throw new Error(`batch ${meta.batchId}: ${r.failure.message}`)
  // B is the batch's own row count (a classifier's last validation batch is shorter)
  return { data: r.success.payload, headers: { [HEADER_BATCH]: JSON.stringify({ ...meta, B: batch.size }), [HEADERS.manifest]: manifestToJson(r.success.manifest) } }
}

// ---------------------------------------------------------------- the client

export type LeaseResult =
  | { readonly _tag: "Batch"; readonly meta: BatchLeased; readonly batch: Batch }
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
  const manifest = m.headers[HEADERS.manifest]
  if (manifest === undefined) return { _tag: "Failed", reason: `batch ${d.success.batchId}: no ${HEADERS.manifest} header` }
  // copy: the bus may reuse the message buffer, and int32/float32 views need 4-byte alignment
  const payload = new Uint8Array(m.data.byteLength)
  payload.set(m.data)
  const bundle = decodeBundle(manifest, payload)
  if (Result.isFailure(bundle)) return { _tag: "Failed", reason: `batch ${d.success.batchId}: ${bundle.failure.message}` }
  const tensors = new Map<string, Int32Array | Float32Array>()
  for (const t of bundle.success.tensors) {
    if (t.dtype !== "int32" && t.dtype !== "float32") return { _tag: "Failed", reason: `batch ${d.success.batchId}: tensor ${t.name} is ${t.dtype}; batches carry int32 and float32 only` }
    tensors.set(t.name, t.data as Int32Array | Float32Array)
  }
  return { _tag: "Batch", meta: d.success, batch: { size: d.success.B, tensors } }
}

export const LoaderClient = {
  /** Lease the next train batch (or val batch `index`). Never fails: a failure is `Failed`. */
  lease: (bus: BusShape, s: Subjects, worker: string, split: "train" | "val", index?: number, timeoutMs = 5_000): Effect.Effect<LeaseResult> =>
    bus.request(s.dataLease(worker), encodeMessage(leaseBatch(worker, split, index)), { timeoutMs }).pipe(
      Effect.map(decodeBatch),
      Effect.catch((e) => Effect.succeed<LeaseResult>({ _tag: "Failed", reason: `${e._tag}: ${e.message}` }))
    ),
  /**
   * Lease the next train batch and check it with `problem` (the model's batch spec): a batch
   * that does not fit goes back to the loader with the reason (it counts it against the
   * batch) and is answered here as `Failed`. Never fails.
   */
  leaseChecked: (bus: BusShape, s: Subjects, worker: string, problem: (b: Batch) => string | undefined): Effect.Effect<LeaseResult> =>
    LoaderClient.lease(bus, s, worker, "train").pipe(
      Effect.flatMap((r) => {
        const bad = r._tag === "Batch" ? problem(r.batch) : undefined
        if (r._tag !== "Batch" || bad === undefined) return Effect.succeed(r)
        return LoaderClient.fail(bus, s, worker, r.meta.batchId, r.meta.gen, `bad batch: ${bad}`).pipe(
          Effect.andThen(Effect.logWarning(`${worker}: batch ${r.meta.batchId} refused: ${bad}`)),
          Effect.as<LeaseResult>({ _tag: "Failed", reason: `bad batch ${r.meta.batchId}: ${bad}` })
        )
      })
    ),
  /** A train batch by id, read only (a pipeline's last stage fetches its labels). Never fails: a failure is `Failed`. */
  fetch: (bus: BusShape, s: Subjects, worker: string, batchId: string, timeoutMs = 5_000): Effect.Effect<LeaseResult> =>
    bus.request(s.dataFetch, encodeMessage(fetchBatch(worker, batchId)), { timeoutMs }).pipe(
      Effect.map(decodeBatch),
      Effect.catch((e) => Effect.succeed<LeaseResult>({ _tag: "Failed", reason: `${e._tag}: ${e.message}` }))
    ),
  /** What the data is (task, sizes, labels, tokenizer); fails when no loader answers. */
  info: (bus: BusShape, s: Subjects, from: string, timeoutMs = 5_000): Effect.Effect<DataInfo, Error> =>
    bus.request(s.dataInfo, encodeMessage(getDataInfo(from)), { timeoutMs }).pipe(
      Effect.mapError((e) => new Error(`${s.dataInfo}: ${e.message}`)),
      Effect.flatMap((m) => Effect.fromResult(decodeBytes(DataInfo, m.subject, m.data)).pipe(Effect.mapError((e) => new Error(e.message))))
    ),
  /** Give a leased batch back (failed, or its gradient is known stale). Never fails. */
  fail: (bus: BusShape, s: Subjects, worker: string, batchId: string, gen: number, reason: string): Effect.Effect<void> =>
    bus.publish(s.dataAck(worker), encodeMessage(batchFailed(worker, batchId, gen, reason))).pipe(
      Effect.catch((e) => Effect.logWarning(`${worker}: BatchFailed for ${batchId} not sent: ${e.message}`))
    )
}
