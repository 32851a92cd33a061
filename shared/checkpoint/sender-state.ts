/**
 * Implements: a gradient sender's saved state — its error-feedback residuals (what its
 * lossy codec still owes the parameter servers, shared/wire/compression.ts), so a worker or
 * a relay that restarts under the same id sends it instead of dropping it.
 *
 * File: `<checkpointDir>/<job>/senders/<id>.ef`, written to a temp file, fsynced and renamed
 * over (a crash leaves the old file or the new one). Layout:
 *   8 bytes  magic "FLOTEF01"
 *   4 bytes  header length H (uint32 LE)
 *   H bytes  header JSON { job, sender, version, runs, crc32, tensors: [{ name, length }] }, padded with spaces to 4
 *   payload  the residuals as float32 LE, in header order
 * A file of another job or sender, a bad magic, a short payload or a CRC mismatch is
 * reported as `Corrupt` with the reason, and the sender starts from zero residuals.
 * `runs` names each shard's run (ParamsMeta.run): residuals are restored only into the run
 * they were made in (a fresh start of the job makes a new run; a resume keeps it).
 * Saved with the job's checkpoint cadence and on a clean exit: a crash loses at most the
 * error of the steps since the last save (each step's error is bounded by its codec).
 * `SenderResiduals` is the one load / restore / cadence / save rule of every sender.
 * Does not own: the residuals' arithmetic (compression.ts), the moments a sender saves at.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync } from "node:fs"
import { dirname, join } from "node:path"
import type { JobConfig } from "../config/job.ts"
import { crc32 } from "../wire/crc32.ts"

const MAGIC = "FLOTEF01"

export const senderStateFile = (job: JobConfig, id: string): string => join(job.train.checkpointDir, job.job, "senders", `${id}.ef`)

export interface SenderState {
  readonly job: string
  readonly sender: string
  /** the params version of the last gradient sent before the save. */
  readonly version: number
  /** each shard's run (ParamsMeta.run) the residuals belong to: restored only into the same run. */
  readonly runs: Readonly<Record<string, number>>
  readonly residuals: ReadonlyMap<string, Float32Array>
}

export const encodeSenderState = (st: SenderState): Uint8Array => {
  const tensors = [...st.residuals].map(([name, r]) => ({ name, length: r.length }))
  const n = tensors.reduce((a, t) => a + t.length, 0)
  const payload = new Float32Array(n)
  let at = 0
  for (const r of st.residuals.values()) {
    payload.set(r, at)
    at += r.length
  }
  const bytes = new Uint8Array(payload.buffer)
  let header = JSON.stringify({ job: st.job, sender: st.sender, version: st.version, runs: st.runs, crc32: crc32(bytes), tensors })
  header += " ".repeat((4 - ((MAGIC.length + 4 + Buffer.byteLength(header)) % 4)) % 4)
  const h = Buffer.from(header, "utf8")
  const out = new Uint8Array(MAGIC.length + 4 + h.length + bytes.length)
  out.set(Buffer.from(MAGIC, "ascii"), 0)
  new DataView(out.buffer).setUint32(MAGIC.length, h.length, true)
  out.set(h, MAGIC.length + 4)
  out.set(bytes, MAGIC.length + 4 + h.length)
  return out
}

export type LoadedSenderState =
  | ({ readonly _tag: "Loaded" } & SenderState)
  | { readonly _tag: "Missing" }
  | { readonly _tag: "Corrupt"; readonly reason: string }

export const decodeSenderState = (bytes: Uint8Array, job: string, sender: string, where: string): LoadedSenderState => {
  const corrupt = (why: string): LoadedSenderState => ({ _tag: "Corrupt", reason: `sender state ${where} is unusable: ${why}` })
  if (bytes.length < MAGIC.length + 4 || Buffer.from(bytes.subarray(0, MAGIC.length)).toString("ascii") !== MAGIC) return corrupt("bad magic (not a Flotilla sender state)")
  const hlen = new DataView(bytes.buffer, bytes.byteOffset).getUint32(MAGIC.length, true)
  const start = MAGIC.length + 4 + hlen
  if (start > bytes.length) return corrupt(`header length ${hlen} runs past the end`)
  let h: { job?: unknown; sender?: unknown; version?: unknown; runs?: unknown; crc32?: unknown; tensors?: unknown }
  try {
    h = JSON.parse(Buffer.from(bytes.subarray(MAGIC.length + 4, start)).toString("utf8"))
  } catch (e) {
    return corrupt(`header is not JSON (${(e as Error).message})`)
  }
  if (h.job !== job || h.sender !== sender) return corrupt(`it is ${String(h.sender)}'s of job ${String(h.job)}, not ${sender}'s of ${job}`)
  const tensors = Array.isArray(h.tensors) ? (h.tensors as Array<{ name?: unknown; length?: unknown }>) : undefined
  if (!tensors || !tensors.every((t) => typeof t.name === "string" && Number.isSafeInteger(t.length) && (t.length as number) >= 0)) return corrupt("bad tensor list")
  const n = tensors.reduce((a, t) => a + (t.length as number), 0)
  if (bytes.length - start !== n * 4) return corrupt(`payload is ${bytes.length - start} bytes, the header needs ${n * 4} (truncated?)`)
  const payload = new Float32Array(Uint8Array.prototype.slice.call(bytes, start).buffer)
  if (crc32(new Uint8Array(payload.buffer)) !== h.crc32) return corrupt("CRC32 mismatch")
  const residuals = new Map<string, Float32Array>()
  let at = 0
  for (const t of tensors) {
    residuals.set(t.name as string, payload.subarray(at, at + (t.length as number)))
    at += t.length as number
  }
  const runs = typeof h.runs === "object" && h.runs !== null ? Object.fromEntries(Object.entries(h.runs).filter(([, r]) => typeof r === "number")) as Record<string, number> : {}
  return { _tag: "Loaded", job, sender, version: Number(h.version) || 0, runs, residuals }
}

export const loadSenderState = (file: string, job: string, sender: string): LoadedSenderState => {
  let bytes: Uint8Array
  try {
    bytes = new Uint8Array(readFileSync(file))
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "ENOENT" ? { _tag: "Missing" } : { _tag: "Corrupt", reason: `cannot read ${file}: ${(e as Error).message}` }
  }
  return decodeSenderState(bytes, job, sender, file)
}

/**
 * Put saved residuals back into `residuals`: those of tensors whose shard is in the same run
 * now as when they were saved (`runNow`, from the params), and whose length still fits.
 */
export const restoreResiduals = (
  residuals: Map<string, Float32Array>,
  saved: SenderState,
  runNow: (shard: number) => number | undefined,
  shardOf: ReadonlyMap<string, number>,
  lengths: ReadonlyMap<string, number>
): { readonly restored: number; readonly dropped: number } => {
  let restored = 0
  let dropped = 0
  for (const [name, r] of saved.residuals) {
    const k = shardOf.get(name)
    if (k !== undefined && saved.runs[String(k)] !== undefined && saved.runs[String(k)] === runNow(k) && lengths.get(name) === r.length) {
      residuals.set(name, Float32Array.from(r))
      restored++
    } else dropped++
  }
  return { restored, dropped }
}

/** Atomic: temp file, fsync, rename. */
export const saveSenderState = (file: string, st: SenderState): void => {
  mkdirSync(dirname(file), { recursive: true })
  const tmp = `${file}.tmp-${process.pid}`
  const fd = openSync(tmp, "w")
  try {
    writeSync(fd, encodeSenderState(st))
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  renameSync(tmp, file)
}

/**
 * One sender's residuals on disk, the rules every sender (worker, stage worker, relay)
 * follows: the file is read at start (`corrupt` says why it cannot be used); `restore`
 * puts it back once, when the params say which run each shard is in; `due` says a version
 * crosses the job's checkpoint cadence since the last save; `save` writes (throws on an I/O
 * error). Nothing is written while no residual is owed.
 */
export class SenderResiduals {
  readonly file: string
  /** the encoder's residuals (GradEncoder.residuals): restored into, saved from */
  readonly residuals: Map<string, Float32Array>
  private readonly job: JobConfig
  private readonly id: string
  private readonly shardOf: ReadonlyMap<string, number>
  /** each tensor's element count: a residual of another length (another model) is dropped */
  private readonly lengths: ReadonlyMap<string, number>
  private pending: LoadedSenderState | undefined
  private savedAt = -1
  constructor(job: JobConfig, id: string, residuals: Map<string, Float32Array>, shardOf: ReadonlyMap<string, number>, lengths: ReadonlyMap<string, number>) {
    this.job = job
    this.id = id
    this.residuals = residuals
    this.shardOf = shardOf
    this.lengths = lengths
    this.file = senderStateFile(job, id)
    this.pending = loadSenderState(this.file, job.job, id)
  }

  /** why the saved file cannot be used (the sender starts from zero residuals), if it cannot. */
  get corrupt(): string | undefined {
    return this.pending?._tag === "Corrupt" ? this.pending.reason : undefined
  }

  /** A saved file is still to be restored. */
  get waiting(): boolean {
    return this.pending?._tag === "Loaded"
  }

  /** Restore (once) what was saved in the runs `runNow` says; the line to log, or undefined. */
  restore(runNow: (shard: number) => number | undefined): string | undefined {
    const saved = this.pending
    this.pending = undefined
    if (saved?._tag !== "Loaded") return undefined
    const r = restoreResiduals(this.residuals, saved, runNow, this.shardOf, this.lengths)
    return `error-feedback residuals of ${r.restored} tensors restored from ${this.file}${r.dropped ? `; ${r.dropped} dropped (another run of the job, or another model)` : ""}`
  }

  /** `version` is past a checkpoint boundary (train.checkpointEvery) the last save was not. */
  due(version: number): boolean {
    const every = this.job.train.checkpointEvery
    return every > 0 && Math.floor(version / every) > Math.floor(this.savedAt / every)
  }

  /** The version of the last save (−1: none yet). */
  get lastSaved(): number {
    return this.savedAt
  }

  /** save, and say why it could not (a line to log), or undefined. */
  trySave(version: number, runs: ReadonlyMap<number, number>): string | undefined {
    try {
      this.save(version, runs)
      return undefined
    } catch (e) {
      return `could not save its residuals: ${String(e)}`
    }
  }

  /** Write the residuals owed after `version`, tagged with each shard's run (`runs`). */
  save(version: number, runs: ReadonlyMap<number, number>): void {
    if (this.residuals.size === 0) return
    saveSenderState(this.file, { job: this.job.job, sender: this.id, version, runs: Object.fromEntries([...runs].map(([k, r]) => [String(k), r])), residuals: this.residuals })
    this.savedAt = version
  }
}

/** Each tensor's element count, for SenderResiduals. */
export const tensorLengths = (specs: ReadonlyArray<{ readonly name: string; readonly shape: ReadonlyArray<number> }>): Map<string, number> =>
  new Map(specs.map((sp) => [sp.name, sp.shape.reduce((a, b) => a * b, 1)]))
