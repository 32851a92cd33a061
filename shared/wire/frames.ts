// Implements: cutting one payload into frames that each fit the bus's max_payload, and the
// `Reassembler` that puts frames back together on the receiving side, detecting and
// reporting every way a message can go wrong (missing, duplicated, corrupt chunks;
// inconsistent or malformed headers; oversize totals; memory budget; timeouts).
// Memory is charged in full when a message's first frame is seen (budget.ts: its declared
// total and chunk count, against its sender's quota and a pool).
// Does not own: what the payload means (tensor.ts), the bus (transport.ts).
//
// Framing rules (protocol v1). A message of `total` bytes with id `id` becomes n ≥ 1
// frames; frame i carries bytes [offset_i, offset_i + len_i) and these headers:
//   Flotilla-Wire       "1"                  protocol version
//   Flotilla-Id         message id           unique per message (sender, process, counter)
//   Flotilla-Chunk      i                    0-based
//   Flotilla-Chunks     n
//   Flotilla-Offset     offset_i             byte offset of this chunk in the payload
//   Flotilla-Chunk-Crc  crc32(chunk i)       8 lowercase hex digits, CRC-32/IEEE
//   Flotilla-Total      total                payload bytes
//   Flotilla-Crc        crc32(payload)       8 lowercase hex digits
//   Flotilla-Manifest   JSON (frame 0 only)  opaque to this module; ASCII
// plus every header the caller passed (e.g. `traceparent`) on every frame. Chunks are
// contiguous and in order (offset_0 = 0, offset_{i+1} = offset_i + len_i, last end = total);
// frame 0 is shorter by the manifest's size. Every frame (data + encoded headers) fits
// maxPayload − headroom (default 8 KiB). An empty payload is one frame with no data.
// Frames may arrive in any order; a receiver copies each chunk once into a buffer of
// `total` bytes allocated at the first frame it sees of that id.

import { Data, Result } from "effect"
import type { Headers } from "../bus/Bus.ts"
import { HEADERS } from "../protocol/headers.ts"
import { crc32, crc32Combine } from "./crc32.ts"
import { allocBytes } from "./tensor.ts"
import { MIN_CHUNK_BYTES, ReceiveBudget, type BudgetProblem, type Charge } from "./budget.ts"

export const FRAME_PROTOCOL_VERSION = "1"

export const H = {
  wire: HEADERS.wire,
  id: HEADERS.id,
  chunk: HEADERS.chunk,
  chunks: HEADERS.chunks,
  offset: HEADERS.offset,
  chunkCrc: HEADERS.chunkCrc,
  total: HEADERS.total,
  crc: HEADERS.crc,
  manifest: HEADERS.manifest
} as const

/** Bytes kept free under maxPayload for headers other than the manifest. */
export const DEFAULT_HEADROOM = 8 * 1024

export interface Frame {
  readonly headers: Headers
  /** A view into the sender's payload (no copy). */
  readonly data: Uint8Array
}

export type WireFrameReason =
  | "bad-header" //           a required header is missing or malformed
  | "unsupported-version" //  Flotilla-Wire is not a version this code speaks
  | "inconsistent-headers" // chunks/total/crc differ from earlier frames of the same id
  | "chunk-out-of-range" //   index ≥ count, or offset + length past total
  | "duplicate-chunk" //      a chunk index seen before (the first copy is kept)
  | "chunk-crc-mismatch" //   a corrupt or truncated chunk
  | "bad-layout" //           chunks leave a gap or overlap
  | "payload-crc-mismatch" // every chunk checks, but the whole does not match Flotilla-Crc
  | "oversize" //             declared total above maxMessageBytes
  | "over-budget" //          too many partial messages or bytes held
  | "timeout" //              chunks still missing after timeoutMs without progress
  | "max-payload-too-small" // sender: maxPayload − headroom leaves no room for data
  | "manifest-too-large" //   sender: the manifest does not fit in one frame's headers
  | "refused" //              sender: no queue-group member claimed the message (transport.ts)

export class WireFrameError extends Data.TaggedError("WireFrameError")<{
  readonly reason: WireFrameReason
  /** Message id, when the frame had one. */
  readonly id: string | undefined
  readonly message: string
}> {}

const hex8 = (n: number): string => (n >>> 0).toString(16).padStart(8, "0")

/** Bytes the headers take in NATS's encoding ("key: value\r\n" each; ASCII assumed). */
export const headerBytes = (headers: Headers): number => {
  let n = 12 // "NATS/1.0\r\n" + final "\r\n"
  for (const k in headers) n += k.length + headers[k].length + 4
  return n
}

let counter = 0
const processTag = Math.floor(Math.random() * 0x1_0000_0000).toString(16).padStart(8, "0")

/** A message id unique across processes: `<sender>-<random per process>-<counter>`. */
export const newMessageId = (sender: string): string => `${sender}-${processTag}-${(counter++).toString(36)}`

export interface FrameOptions {
  readonly id: string
  /** The bus's maxPayload (data + headers). */
  readonly maxPayload: number
  /** Default DEFAULT_HEADROOM. */
  readonly headroom?: number
  /** Goes in the Flotilla-Manifest header of frame 0. Must be ASCII without CR/LF. */
  readonly manifest?: string
  /** Copied onto every frame (e.g. traceparent); Flotilla-* names are overridden. */
  readonly headers?: Headers
}

/** Cut `payload` into frames (views, no copy). One CRC pass over the payload. */
export const frameMessage = (payload: Uint8Array, opts: FrameOptions): Result.Result<Array<Frame>, WireFrameError> => {
  const fail = (reason: WireFrameReason, message: string) => Result.fail(new WireFrameError({ reason, id: opts.id, message }))
  const total = payload.length
  const fixed: Record<string, string> = { ...opts.headers, [H.wire]: FRAME_PROTOCOL_VERSION, [H.id]: opts.id }
  // Our numeric headers at their widest (index/count/offset ≤ 16 digits, CRCs 8).
  const ours = headerBytes(fixed) + 6 * 20 + 2 * 8 + 7 * 24
  const room = opts.maxPayload - (opts.headroom ?? DEFAULT_HEADROOM) - ours
  if (room < MIN_CHUNK_BYTES) {
    return fail("max-payload-too-small", `maxPayload ${opts.maxPayload} leaves ${room} bytes per frame after headers and headroom`)
  }
  const manifestCost = opts.manifest === undefined ? 0 : H.manifest.length + opts.manifest.length + 4
  const room0 = room - manifestCost
  if (room0 < 0) return fail("manifest-too-large", `the manifest (${opts.manifest?.length} bytes) does not fit in a frame of ${room} header bytes`)
  const first = Math.min(room0, total)
  const count = 1 + Math.ceil((total - first) / room)
  const frames: Array<Frame> = []
  let whole = 0
  for (let i = 0, offset = 0; i < count; i++) {
    const len = i === 0 ? first : Math.min(room, total - offset)
    const data = payload.subarray(offset, offset + len)
    const c = crc32(data)
    whole = i === 0 ? c : crc32Combine(whole, c, len)
    const headers: Record<string, string> = {
      ...fixed,
      [H.chunk]: String(i),
      [H.chunks]: String(count),
      [H.offset]: String(offset),
      [H.chunkCrc]: hex8(c),
      [H.total]: String(total)
    }
    if (i === 0 && opts.manifest !== undefined) headers[H.manifest] = opts.manifest
    frames.push({ headers, data })
    offset += len
  }
  const crc = hex8(whole)
  for (const f of frames) (f.headers as Record<string, string>)[H.crc] = crc
  return Result.succeed(frames)
}

// ---------------------------------------------------------------------------------------
// Memory

/**
 * A few recycled payload buffers. Fresh multi-MB allocations cost page faults on every
 * send and receive (PERF: ~1 ms per 3.5 MB on a busy 2-core host, more than the copy
 * itself); a pool turns them into warm reuse. Only `give` a buffer nobody reads any more.
 */
export class BufferPool {
  private readonly free: Array<ArrayBuffer> = []
  private held = 0
  /** Keeps at most `maxBuffers` buffers and `maxBytes` bytes. */
  readonly maxBuffers: number
  readonly maxBytes: number
  constructor(maxBuffers = 4, maxBytes = 64 * 1024 * 1024) {
    this.maxBuffers = maxBuffers
    this.maxBytes = maxBytes
  }

  /** `n` bytes at offset 0 of a pooled buffer of at most 2n bytes, else a fresh one. */
  take = (n: number): Uint8Array => {
    let best = -1
    for (let i = 0; i < this.free.length; i++) {
      const len = this.free[i].byteLength
      if (len >= n && len <= 2 * n + 4096 && (best < 0 || len < this.free[best].byteLength)) best = i
    }
    if (best < 0) return allocBytes(n)
    const [buf] = this.free.splice(best, 1)
    this.held -= buf.byteLength
    return new Uint8Array(buf, 0, n)
  }

  /** Return the buffer under `bytes` (a view from `take`) for reuse. */
  give = (bytes: Uint8Array): void => {
    const buf = bytes.buffer
    if (!(buf instanceof ArrayBuffer) || bytes.byteOffset !== 0 || buf.byteLength > this.maxBytes || this.free.includes(buf)) return
    while (this.free.length >= this.maxBuffers || this.held + buf.byteLength > this.maxBytes) this.held -= this.free.shift()!.byteLength
    this.free.push(buf)
    this.held += buf.byteLength
  }
}

// ---------------------------------------------------------------------------------------
// Receiving

export interface ReassemblerOptions {
  /** Largest declared total accepted. Default 256 MiB. */
  readonly maxMessageBytes?: number
  /** Sum of the buffers (and chunk bookkeeping) of incomplete messages of known senders. Default 512 MiB. */
  readonly maxOutstandingBytes?: number
  /** Incomplete messages of known senders held at once. Default 64. */
  readonly maxOutstandingMessages?: number
  /** Incomplete messages one sender may hold. Default maxOutstandingMessages. */
  readonly maxMessagesPerSender?: number
  /** Bytes one sender's incomplete messages may hold. Default maxOutstandingBytes. */
  readonly maxBytesPerSender?: number
  /** The senders of the first pool (default: every sender); the others share the unknown pool. */
  readonly isKnownSender?: (sender: string) => boolean
  /** The unknown senders' pool: messages and bytes. Default 8, and maxMessageBytes. */
  readonly maxUnknownMessages?: number
  readonly maxUnknownBytes?: number
  /** An incomplete message with no new chunk for this long is dropped by `sweep`. Default 30 s. */
  readonly timeoutMs?: number
  /** Ids of finished (complete or failed) messages remembered to catch late chunks. Default 4096. */
  readonly rememberIds?: number
  /** Memory for a message's payload (n bytes, 4-aligned); default a fresh buffer. */
  readonly alloc?: (n: number) => Uint8Array
}

export interface ReassembledMessage {
  readonly id: string
  /** Exactly `total` bytes at a 4-aligned address (from `alloc`). */
  readonly payload: Uint8Array
  /** Flotilla-Manifest of frame 0, when present. */
  readonly manifest: string | undefined
  /** All headers of frame 0 (the caller's, e.g. traceparent, included). */
  readonly headers: Headers
  readonly chunks: number
  /** Some frame arrived before a lower-numbered one (accepted and reordered). */
  readonly outOfOrder: boolean
}

export type AcceptResult =
  | { readonly _tag: "Pending"; readonly id: string; readonly received: number; readonly count: number }
  | { readonly _tag: "Complete"; readonly message: ReassembledMessage }
  | { readonly _tag: "Rejected"; readonly error: WireFrameError }
  /** A frame of a message that already failed (its failure was reported once). */
  | { readonly _tag: "Dropped"; readonly id: string }

export interface ReassemblerStats {
  completed: number
  rejected: number
  duplicates: number
  outOfOrder: number
  dropped: number
  timedOut: number
}

interface Partial {
  readonly id: string
  /** what it is charged, to whom (budget.ts). */
  readonly charge: Charge
  readonly count: number
  readonly total: number
  readonly crc: string
  readonly buffer: Uint8Array
  readonly seen: Uint8Array
  readonly offsets: Float64Array
  readonly lengths: Float64Array
  readonly crcs: Uint32Array
  received: number
  lastIndex: number
  outOfOrder: boolean
  lastSeenMs: number
  headers: Headers | undefined
}

const DEC = /^(0|[1-9][0-9]{0,15})$/
const HEX8 = /^[0-9a-f]{8}$/

export class Reassembler {
  readonly maxMessageBytes: number
  readonly maxOutstandingBytes: number
  readonly maxOutstandingMessages: number
  readonly timeoutMs: number
  readonly rememberIds: number
  /** what incomplete messages hold, by sender and pool (budget.ts). */
  readonly budget: ReceiveBudget
  private readonly alloc: (n: number) => Uint8Array
  readonly stats: ReassemblerStats = { completed: 0, rejected: 0, duplicates: 0, outOfOrder: 0, dropped: 0, timedOut: 0 }
  private readonly partials = new Map<string, Partial>()
  /** Finished ids, oldest first: "done" or "failed". */
  private readonly finished = new Map<string, "done" | "failed">()

  constructor(opts: ReassemblerOptions = {}) {
    this.maxMessageBytes = opts.maxMessageBytes ?? 256 * 1024 * 1024
    this.maxOutstandingBytes = opts.maxOutstandingBytes ?? 512 * 1024 * 1024
    this.maxOutstandingMessages = opts.maxOutstandingMessages ?? 64
    this.budget = new ReceiveBudget({ ...opts, maxMessageBytes: this.maxMessageBytes, maxOutstandingBytes: this.maxOutstandingBytes, maxOutstandingMessages: this.maxOutstandingMessages })
    this.timeoutMs = opts.timeoutMs ?? 30_000
    this.rememberIds = opts.rememberIds ?? 4096
    this.alloc = opts.alloc ?? allocBytes
  }

  get outstandingMessages(): number {
    return this.partials.size
  }

  /** What incomplete messages are charged (buffers and chunk bookkeeping). */
  get outstandingBytes(): number {
    return this.budget.bytes
  }

  /** Why a new message cannot be taken now (budget.ts), or undefined; a claim is answered by it (transport.ts). */
  budgetProblem(id: string, total: number, count: number): BudgetProblem | undefined {
    return this.budget.problem(id, total, count)
  }

  /** Take one frame. `data` is only read during the call (copied into the message buffer). */
  accept(headers: Headers, data: Uint8Array, nowMs: number): AcceptResult {
    const id = headers[H.id]
    if (id === undefined || id.length === 0) {
      this.stats.rejected++
      return { _tag: "Rejected", error: new WireFrameError({ reason: "bad-header", id: undefined, message: `frame without ${H.id}` }) }
    }
    // fatal: the message cannot complete any more, so it is failed now (reported once).
    const reject = (reason: WireFrameReason, message: string, fatal: boolean): AcceptResult => {
      if (fatal) return this.rejectMessage(id, reason, message)
      this.stats.rejected++
      return { _tag: "Rejected", error: new WireFrameError({ reason, id, message }) }
    }
    const state = this.finished.get(id)
    if (state === "failed") {
      this.stats.dropped++
      return { _tag: "Dropped", id }
    }
    if (state === "done") {
      this.stats.duplicates++
      return reject("duplicate-chunk", `message ${id}: chunk ${headers[H.chunk]} arrived after the message was complete`, false)
    }
    const version = headers[H.wire]
    if (version !== FRAME_PROTOCOL_VERSION) {
      return reject(version === undefined ? "bad-header" : "unsupported-version", `message ${id}: ${H.wire} is ${JSON.stringify(version)}, this receiver speaks ${FRAME_PROTOCOL_VERSION}`, true)
    }
    const num = (name: string): number => (DEC.test(headers[name] ?? "") ? Number(headers[name]) : -1)
    const index = num(H.chunk)
    const count = num(H.chunks)
    const offset = num(H.offset)
    const total = num(H.total)
    const chunkCrc = headers[H.chunkCrc] ?? ""
    const crc = headers[H.crc] ?? ""
    const badName = index < 0 ? H.chunk : count < 1 ? H.chunks : offset < 0 ? H.offset : total < 0 ? H.total : !HEX8.test(chunkCrc) ? H.chunkCrc : !HEX8.test(crc) ? H.crc : undefined
    if (badName !== undefined) return reject("bad-header", `message ${id}: ${badName} is ${JSON.stringify(headers[badName])}`, true)
    if (index >= count) return reject("chunk-out-of-range", `message ${id}: chunk ${index} of ${count}`, true)
    if (offset + data.length > total) {
      return reject("chunk-out-of-range", `message ${id}: chunk ${index} covers [${offset}, ${offset + data.length}) past total ${total}`, true)
    }

    let p = this.partials.get(id)
    if (p === undefined) {
      // charged in full now: the declared total and chunk count, not the bytes that came
      const over = this.budgetProblem(id, total, count)
      if (over !== undefined) return reject(over.reason, over.message, true)
      p = {
        id,
        charge: this.budget.charge(id, total, count),
        count,
        total,
        crc,
        buffer: this.alloc(total), // not zeroed: the layout check guarantees full coverage
        seen: new Uint8Array(count),
        offsets: new Float64Array(count),
        lengths: new Float64Array(count),
        crcs: new Uint32Array(count),
        received: 0,
        lastIndex: -1,
        outOfOrder: false,
        lastSeenMs: nowMs,
        headers: undefined
      }
      this.partials.set(id, p)
    } else if (p.count !== count || p.total !== total || p.crc !== crc) {
      return reject("inconsistent-headers", `message ${id}: chunk ${index} says ${count} chunks / ${total} bytes / crc ${crc}, earlier ${p.count} / ${p.total} / ${p.crc}`, true)
    }
    if (p.seen[index] === 1) {
      // not progress: a sender repeating one chunk does not keep its message alive past timeoutMs
      this.stats.duplicates++
      return reject("duplicate-chunk", `message ${id}: chunk ${index} of ${count} received twice (first copy kept)`, false)
    }
    const c = crc32(data)
    if (c !== parseInt(chunkCrc, 16)) {
      return reject("chunk-crc-mismatch", `message ${id}: chunk ${index} (${data.length} bytes) has crc ${hex8(c)}, header says ${chunkCrc}`, true)
    }
    p.buffer.set(data, offset)
    p.seen[index] = 1
    p.offsets[index] = offset
    p.lengths[index] = data.length
    p.crcs[index] = c
    p.received++
    p.lastSeenMs = nowMs
    if (index !== p.lastIndex + 1) {
      p.outOfOrder = true
      this.stats.outOfOrder++
    }
    p.lastIndex = index
    if (index === 0) p.headers = headers
    if (p.received < p.count) return { _tag: "Pending", id, received: p.received, count }
    return this.complete(p)
  }

  private complete(p: Partial): AcceptResult {
    let cursor = 0
    let whole = 0
    for (let i = 0; i < p.count; i++) {
      if (p.offsets[i] !== cursor) {
        return this.rejectMessage(p.id, "bad-layout", `message ${p.id}: chunk ${i} starts at ${p.offsets[i]}, expected ${cursor} (gap or overlap)`)
      }
      whole = i === 0 ? p.crcs[0] : crc32Combine(whole, p.crcs[i], p.lengths[i])
      cursor += p.lengths[i]
    }
    if (cursor !== p.total) return this.rejectMessage(p.id, "bad-layout", `message ${p.id}: chunks cover ${cursor} bytes, total is ${p.total}`)
    if (hex8(whole) !== p.crc) return this.rejectMessage(p.id, "payload-crc-mismatch", `message ${p.id}: payload crc ${hex8(whole)}, header says ${p.crc}`)
    this.finish(p.id, "done")
    this.stats.completed++
    const headers = p.headers ?? {}
    return {
      _tag: "Complete",
      message: { id: p.id, payload: p.buffer, manifest: headers[H.manifest], headers, chunks: p.count, outOfOrder: p.outOfOrder }
    }
  }

  /** Report once and forget the message: its later frames are `Dropped`. */
  private rejectMessage(id: string, reason: WireFrameReason, message: string): AcceptResult {
    this.stats.rejected++
    this.finish(id, "failed")
    return { _tag: "Rejected", error: new WireFrameError({ reason, id, message }) }
  }

  /** Drop incomplete messages with no progress for timeoutMs (`all`: every one); one "timeout" error each. */
  sweep(nowMs: number, all = false): Array<WireFrameError> {
    const errors: Array<WireFrameError> = []
    for (const p of [...this.partials.values()]) {
      if (!all && nowMs - p.lastSeenMs < this.timeoutMs) continue
      const missing: Array<number> = []
      for (let i = 0; i < p.count && missing.length < 16; i++) if (p.seen[i] === 0) missing.push(i)
      const more = p.count - p.received > missing.length ? ", ..." : ""
      this.stats.timedOut++
      this.finish(p.id, "failed")
      errors.push(new WireFrameError({
        reason: "timeout",
        id: p.id,
        message: `message ${p.id}: ${p.received} of ${p.count} chunks after ${nowMs - p.lastSeenMs} ms without progress; missing ${missing.join(", ")}${more}`
      }))
    }
    return errors
  }

  private finish(id: string, state: "done" | "failed"): void {
    const p = this.partials.get(id)
    if (p !== undefined) {
      this.partials.delete(id)
      this.budget.release(p.charge)
    }
    this.finished.delete(id)
    this.finished.set(id, state)
    if (this.finished.size > this.rememberIds) this.finished.delete(this.finished.keys().next().value!)
  }
}
