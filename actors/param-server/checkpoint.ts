/**
 * Implements: parameter-server checkpoints on local disk — atomic, checksummed, and
 * self-describing.
 *
 * File layout (`<dir>/<job>/ps-<shard>/v<version>.ckpt`):
 *   8 bytes  magic "FLOTCKPT"
 *   4 bytes  header length H (uint32 LE)
 *   H bytes  header JSON: { format: 1, crc32, payloadBytes, manifest, state }
 *   payload  the tensors (params, then optimizer slots as `slot:<slot>:<param>`) in the
 *            wire format's layout (shared/wire/tensor.ts), 4-byte aligned
 * `state` holds what is not a tensor: version, update count, optimizer config, applied
 * batch ids. Writes go to a temp file, are fsynced, then renamed over: a crash leaves the
 * old checkpoint or the new one, never half of one. Loading checks magic, header,
 * length and CRC32; a corrupt file is reported and the previous one is used.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeSync } from "node:fs"
import { join } from "node:path"
import { Result } from "effect"
import { crc32 } from "../../shared/wire/crc32.ts"
import { decodeBundle, encodeBundle, type WireTensor } from "../../shared/wire/tensor.ts"
import type { OptimizerConfig, OptimizerSlots } from "../../shared/optim/optimizers.ts"

const MAGIC = new TextEncoder().encode("FLOTCKPT")
const FORMAT = 1

export class CheckpointError extends Error {
  readonly _tag = "CheckpointError"
}

export interface ShardCheckpoint {
  readonly job: string
  readonly shard: number
  readonly version: number
  readonly updates: number
  readonly optimizer: OptimizerConfig
  readonly appliedBatches: readonly string[]
  readonly params: ReadonlyMap<string, Float32Array>
  readonly shapes: ReadonlyMap<string, readonly number[]>
  readonly slots: ReadonlyMap<string, OptimizerSlots>
}

export const shardDir = (dir: string, job: string, shard: number) => join(dir, job, `ps-${shard}`)

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
      state: { job: c.job, shard: c.shard, version: c.version, updates: c.updates, optimizer: c.optimizer, appliedBatches: c.appliedBatches }
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
  if (header?.format !== FORMAT) fail(`unknown format ${header?.format}`)
  const payload = bytes.slice(start) // copy: aligned, and independent of the file buffer
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
  return { job: st.job, shard: st.shard, version: st.version, updates: st.updates, optimizer: st.optimizer, appliedBatches: st.appliedBatches, params, shapes, slots }
}

/** Write atomically (temp file, fsync, rename); keep the newest `keep` files. */
export const writeCheckpoint = (dir: string, c: ShardCheckpoint, keep = 3): string => {
  const d = shardDir(dir, c.job, c.shard)
  mkdirSync(d, { recursive: true })
  const path = join(d, `v${String(c.version).padStart(8, "0")}.ckpt`)
  const tmp = `${path}.tmp-${process.pid}`
  const bytes = encodeCheckpoint(c)
  const fd = openSync(tmp, "w")
  try {
    writeSync(fd, bytes)
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  renameSync(tmp, path)
  const all = listCheckpoints(dir, c.job, c.shard)
  for (const old of all.slice(0, Math.max(0, all.length - keep))) rmSync(old, { force: true })
  return path
}

/** Checkpoint files of a shard, oldest first. */
export const listCheckpoints = (dir: string, job: string, shard: number): string[] => {
  const d = shardDir(dir, job, shard)
  let names: string[]
  try {
    names = readdirSync(d)
  } catch {
    return []
  }
  return names.filter((n) => /^v\d+\.ckpt$/.test(n)).sort().map((n) => join(d, n))
}

/**
 * The newest checkpoint that loads, newest first; corrupt ones are reported through
 * `onCorrupt` and skipped. undefined when there is none.
 */
export const loadLatestCheckpoint = (
  dir: string,
  job: string,
  shard: number,
  onCorrupt: (path: string, why: string) => void = () => {}
): { path: string; checkpoint: ShardCheckpoint } | undefined => {
  for (const path of listCheckpoints(dir, job, shard).reverse()) {
    try {
      return { path, checkpoint: decodeCheckpoint(new Uint8Array(readFileSync(path)), path) }
    } catch (e) {
      onCorrupt(path, (e as Error).message)
    }
  }
  return undefined
}
