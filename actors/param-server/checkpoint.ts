/**
 * Implements: parameter-server checkpoints — their checksummed, self-describing byte
 * layout, and saving/loading them through the CheckpointStore.
 *
 * Where the bytes live is the CheckpointStore's (shared/checkpoint/store.ts: files at
 * `<dir>/<job>/ps-<shard>/v<version>.ckpt` by default, or a JetStream object store).
 * Layout of one checkpoint:
 *   8 bytes  magic "FLOTCKPT"
 *   4 bytes  header length H (uint32 LE)
 *   H bytes  header JSON: { format: 2, crc32, payloadBytes, manifest, state }
 *   payload  the tensors (params, then optimizer slots as `slot:<slot>:<param>`) in the
 *            wire format's layout (shared/wire/tensor.ts), 4-byte aligned
 * `state` holds what is not a tensor: version, update count, optimizer config (with any
 * live `set-optimizer` change), consistency, the applied log (per-epoch bitmaps: the
 * loader's done set and its cursor are derived from it), and on shard 0 the scheduler's
 * live state (schedule, plateau counters, `set-lr` overrides) as of this version; for a
 * classifier, `data`: its labels and tokenizer (so `flotilla classify` tokenizes alike). With
 * these, a resumed job continues bit-identically. The store writes atomically (a crash
 * leaves the old checkpoint or the new one). Loading checks magic, header, length and
 * CRC32; a corrupt checkpoint is reported and the previous one is used.
 */
import { Effect, Result } from "effect"
import type { CheckpointRef, CheckpointStoreError, CheckpointStoreShape } from "../../shared/checkpoint/store.ts"
import { crc32 } from "../../shared/wire/crc32.ts"
import { decodeBundle, encodeBundle, type WireTensor } from "../../shared/wire/tensor.ts"
import type { OptimizerConfig, OptimizerSlots } from "../../shared/optim/optimizers.ts"
import type { Consistency } from "../../shared/config/job.ts"
import { AppliedLogJson } from "../../shared/protocol/applied-log.ts"
import { decodeValue } from "../../shared/protocol/decode.ts"
import type { CodecSwitch } from "../../shared/wire/compression.ts"

const MAGIC = new TextEncoder().encode("FLOTCKPT")
const FORMAT = 2

export class CheckpointError extends Error {
  readonly _tag = "CheckpointError"
}

export interface ShardCheckpoint {
  readonly job: string
  readonly shard: number
  readonly version: number
  readonly updates: number
  readonly optimizer: OptimizerConfig
  readonly consistency: Consistency
  readonly log: AppliedLogJson
  /** shard 0: the scheduler's state as of this version (shared/schedule/state.ts); else absent. */
  readonly schedule?: unknown
  /** accepted `set-compression`s (absent: none). */
  readonly codecSwitches?: readonly CodecSwitch[]
  /** the run (the first incarnation of a fresh start): senders keep their residuals only within one run. */
  readonly run?: number
  /** what inference needs besides the params (a classifier's labels and tokenizer: DataInfo from the loader); absent for a language model. */
  readonly data?: unknown
  readonly params: ReadonlyMap<string, Float32Array>
  readonly shapes: ReadonlyMap<string, readonly number[]>
  readonly slots: ReadonlyMap<string, OptimizerSlots>
}

export const encodeCheckpoint = (c: ShardCheckpoint): Uint8Array => {
  const tensors: WireTensor[] = []
  for (const [name, p] of c.params) tensors.push({ name, dtype: "float32", shape: c.shapes.get(name)!, data: p })
  for (const [name, slots] of c.slots) {
    for (const [slot, data] of Object.entries(slots)) {
      tensors.push({ name: `slot:${slot}:${name}`, dtype: "float32", shape: [data.length], data })
    }
  }
  const enc = encodeBundle({
    tensors,
    meta: { kind: "checkpoint", job: c.job, version: c.version, step: c.updates, sender: `ps-${c.shard}`, codec: "f32" }
  })
  if (Result.isFailure(enc)) throw new CheckpointError(`cannot encode checkpoint: ${enc.failure.message}`)
  const { manifest, payload } = enc.success
  const header = new TextEncoder().encode(
    JSON.stringify({
      format: FORMAT,
      crc32: crc32(payload),
      payloadBytes: payload.byteLength,
      manifest,
      state: { job: c.job, shard: c.shard, version: c.version, updates: c.updates, optimizer: c.optimizer, consistency: c.consistency, log: c.log, schedule: c.schedule, data: c.data, codecSwitches: c.codecSwitches, run: c.run }
    })
  )
  // pad the header so the payload starts 4-byte aligned in the file
  const pad = (4 - ((MAGIC.length + 4 + header.length) % 4)) % 4
  const out = new Uint8Array(MAGIC.length + 4 + header.length + pad + payload.length)
  out.set(MAGIC, 0)
  new DataView(out.buffer).setUint32(MAGIC.length, header.length + pad, true)
  out.set(header, MAGIC.length + 4)
  out.fill(0x20, MAGIC.length + 4 + header.length, MAGIC.length + 4 + header.length + pad)
  out.set(payload, MAGIC.length + 4 + header.length + pad)
  return out
}

export const decodeCheckpoint = (bytes: Uint8Array, what = "checkpoint"): ShardCheckpoint => {
  const fail = (why: string): never => {
    throw new CheckpointError(`${what} is corrupt: ${why}`)
  }
  if (bytes.length < MAGIC.length + 4) fail(`only ${bytes.length} bytes`)
  for (let i = 0; i < MAGIC.length; i++) if (bytes[i] !== MAGIC[i]) fail("bad magic (not a Flotilla checkpoint)")
  const hlen = new DataView(bytes.buffer, bytes.byteOffset).getUint32(MAGIC.length, true)
  const start = MAGIC.length + 4 + hlen
  if (start > bytes.length) fail(`header length ${hlen} runs past the end of the file`)
  let header: any
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(MAGIC.length + 4, start)))
  } catch (e) {
    fail(`header is not JSON (${(e as Error).message})`)
  }
  if (header?.format !== FORMAT) fail(`unknown format ${header?.format} (this build reads format ${FORMAT})`)
  // a copy (aligned, independent of the source): Uint8Array's slice, since a Node Buffer's slice is a view
  const payload = Uint8Array.prototype.slice.call(bytes, start)
  if (payload.length !== header.payloadBytes) fail(`payload is ${payload.length} bytes, header says ${header.payloadBytes} (truncated?)`)
  if (crc32(payload) !== header.crc32) fail("CRC32 mismatch")
  const dec = decodeBundle(header.manifest, payload)
  if (Result.isFailure(dec)) fail(dec.failure.message)
  const st = header.state
  const params = new Map<string, Float32Array>()
  const shapes = new Map<string, readonly number[]>()
  const slots = new Map<string, OptimizerSlots>()
  for (const t of Result.getOrThrow(dec).tensors) {
    const m = /^slot:([^:]+):(.+)$/.exec(t.name)
    if (m) {
      const s = slots.get(m[2]) ?? {}
      s[m[1]] = t.data as Float32Array
      slots.set(m[2], s)
    } else {
      params.set(t.name, t.data as Float32Array)
      shapes.set(t.name, t.shape)
    }
  }
  const log = decodeValue(AppliedLogJson, what, st?.log)
  if (Result.isFailure(log)) fail(`applied log: ${log.failure.reason}`)
  return {
    job: st.job, shard: st.shard, version: st.version, updates: st.updates, optimizer: st.optimizer, consistency: st.consistency,
    log: Result.getOrThrow(log), schedule: st.schedule, data: st.data, params, shapes, slots,
    ...(Number.isFinite(st.run) ? { run: st.run } : {}),
    ...(Array.isArray(st.codecSwitches) ? { codecSwitches: st.codecSwitches.filter((x: any) => Number.isInteger(x?.fromVersion) && typeof x?.codec === "string") } : {})
  }
}

/** Save through the store (atomic, newest few kept; see shared/checkpoint/store.ts). */
export const saveCheckpoint = (store: CheckpointStoreShape, c: ShardCheckpoint): Effect.Effect<CheckpointRef, CheckpointStoreError> =>
  Effect.suspend(() => store.save(c.job, c.shard, c.version, encodeCheckpoint(c)))

/**
 * The newest checkpoint of a shard with version ≤ `atMost` that loads; corrupt ones are
 * reported through `onCorrupt` and skipped. undefined when there is none.
 */
export const loadCheckpoint = (
  store: CheckpointStoreShape,
  job: string,
  shard: number,
  atMost = Infinity,
  onCorrupt: (where: string, why: string) => Effect.Effect<void> = () => Effect.void
): Effect.Effect<{ path: string; checkpoint: ShardCheckpoint } | undefined, CheckpointStoreError> =>
  Effect.gen(function* () {
    const refs = (yield* store.list(job, shard)).filter((r) => r.version <= atMost)
    for (const ref of [...refs].reverse()) {
      const bytes = yield* store.load(ref).pipe(Effect.result)
      if (Result.isFailure(bytes)) {
        if (bytes.failure.reason === "unavailable") return yield* Effect.fail(bytes.failure)
        yield* onCorrupt(ref.where, bytes.failure.message)
        continue
      }
      try {
        return { path: ref.where, checkpoint: decodeCheckpoint(bytes.success, ref.where) }
      } catch (e) {
        yield* onCorrupt(ref.where, (e as Error).message)
      }
    }
    return undefined
  })
