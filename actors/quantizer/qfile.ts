/**
 * Implements: the quantized model file (`flotilla quantize` writes it; `generate` and
 * `classify` run from it) — its byte layout, writing it, and reading it back with every
 * check a truncated, corrupt or foreign file fails.
 * Does not own: what the tensors mean (qmodel.ts), running them (qforward.ts), the PTQ
 * pipeline (ptq.ts). docs/QUANTIZATION.md "Quantized model file format" is this layout.
 *
 * Layout (all integers little-endian):
 *   0   8 bytes  magic "FLOTQMOD"
 *   8   uint32   format (1)
 *   12  uint32   H: header bytes (JSON, space-padded so the payload starts 4-aligned)
 *   16  uint32   CRC32 of those H header bytes
 *   20  H bytes  header JSON: { mode, job, version, source, model (the job's model block),
 *                data (a classifier's labels and tokenizer), groupSize, activations
 *                (int8-static: absmax per site), tensors: [{ name, shape, dtype, layout?,
 *                group?, offset, bytes, scalesOffset?, scales? }], payloadBytes, payloadCrc32 }
 *   20+H         payload: each tensor's values at `offset` (float32 LE, int8, or int4 two per
 *                byte, low nibble first), then its `scales` float32 scales at `scalesOffset`;
 *                every offset 4-aligned, padding zero, the file ends with the payload.
 */
import { closeSync, openSync, readFileSync, readSync, statSync } from "node:fs"
import { Data, Result, Schema } from "effect"
import { GptModel, LstmModel } from "../../shared/config/job.ts"
import { sizeOf } from "../../shared/models/model.ts"
import { makeModel } from "../../shared/models/zoo.ts"
import { decodeValue } from "../../shared/protocol/decode.ts"
import { crc32 } from "../../shared/wire/crc32.ts"
import { activationSites, dataBytes, QUANT_MODES, scaleCount, type QModel, type QTensor } from "./qmodel.ts"

export const QMODEL_MAGIC = "FLOTQMOD"
export const QMODEL_FORMAT = 1
const PREFIX = 20
const MAGIC = new TextEncoder().encode(QMODEL_MAGIC)
const CKPT_MAGIC = "FLOTCKPT"

export class QModelFileError extends Data.TaggedError("QModelFileError")<{ readonly where: string; readonly message: string }> {}

const TensorEntry = Schema.Struct({
  name: Schema.String,
  shape: Schema.Array(Schema.Int.check(Schema.isGreaterThanOrEqualTo(1))),
  dtype: Schema.Literals(["float32", "int8", "int4"]),
  layout: Schema.optional(Schema.Literals(["rows", "cols"])),
  group: Schema.optional(Schema.Int.check(Schema.isGreaterThanOrEqualTo(1))),
  offset: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  bytes: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  scalesOffset: Schema.optional(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))),
  scales: Schema.optional(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)))
})

const Header = Schema.Struct({
  mode: Schema.Literals(QUANT_MODES),
  job: Schema.String,
  version: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  source: Schema.String,
  model: Schema.Union([GptModel, LstmModel]),
  data: Schema.optional(Schema.Unknown),
  groupSize: Schema.Int.check(Schema.isGreaterThanOrEqualTo(1)),
  activations: Schema.optional(Schema.Record(Schema.String, Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0)))),
  tensors: Schema.Array(TensorEntry),
  payloadBytes: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  payloadCrc32: Schema.Int
})
export type QModelHeader = typeof Header.Type

/** What travels with the tensors. */
export interface QModelInfo {
  readonly job: string
  readonly version: number
  /** the checkpoint it was quantized from */
  readonly source: string
  /** a classifier's labels and tokenizer, as the checkpoint's `data` holds them */
  readonly data?: unknown
  readonly groupSize: number
}

const align4 = (n: number) => (n + 3) & ~3

const littleEndian = (): boolean => new Uint8Array(new Uint16Array([1]).buffer)[0] === 1
const assertLittleEndian = (where: string) => {
  if (!littleEndian()) throw new QModelFileError({ where, message: "this host is big-endian; the quantized model format is little-endian and this build reads it only on little-endian hosts" })
}

const bytesOf = (a: Float32Array | Int8Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength)

/** The file's bytes for a quantized model. */
export const encodeQModel = (qm: QModel, info: QModelInfo): Uint8Array => {
  assertLittleEndian("encode")
  if (qm.mode === "float32") throw new QModelFileError({ where: "encode", message: "a float32 reference model is not written to a file" })
  const entries: Array<typeof TensorEntry.Type> = []
  let cursor = 0
  for (const s of qm.def.specs) {
    const t = qm.tensors.get(s.name)!
    const offset = align4(cursor)
    const bytes = t.data.byteLength
    cursor = offset + bytes
    if (t.dtype === "float32") {
      entries.push({ name: t.name, shape: [...t.shape], dtype: t.dtype, offset, bytes })
      continue
    }
    const scalesOffset = align4(cursor)
    cursor = scalesOffset + 4 * t.scales!.length
    entries.push({ name: t.name, shape: [...t.shape], dtype: t.dtype, layout: t.layout, group: t.group, offset, bytes, scalesOffset, scales: t.scales!.length })
  }
  const payload = new Uint8Array(cursor)
  entries.forEach((e) => {
    const t = qm.tensors.get(e.name)!
    payload.set(bytesOf(t.data), e.offset)
    if (e.scalesOffset !== undefined) payload.set(bytesOf(t.scales!), e.scalesOffset)
  })
  const header: QModelHeader = {
    mode: qm.mode, job: info.job, version: info.version, source: info.source, model: qm.model,
    ...(info.data !== undefined ? { data: info.data } : {}),
    groupSize: info.groupSize,
    ...(qm.activations ? { activations: qm.activations } : {}),
    tensors: entries, payloadBytes: payload.byteLength, payloadCrc32: crc32(payload)
  }
  const json = new TextEncoder().encode(JSON.stringify(header))
  const H = align4(PREFIX + json.length) - PREFIX
  const out = new Uint8Array(PREFIX + H + payload.length)
  out.set(MAGIC, 0)
  out.fill(0x20, PREFIX + json.length, PREFIX + H)
  out.set(json, PREFIX)
  const dv = new DataView(out.buffer)
  dv.setUint32(8, QMODEL_FORMAT, true)
  dv.setUint32(12, H, true)
  dv.setUint32(16, crc32(out.subarray(PREFIX, PREFIX + H)), true)
  out.set(payload, PREFIX + H)
  return out
}

/** Whether `bytes` start like a quantized model file (the magic). */
export const hasQModelMagic = (bytes: Uint8Array): boolean => bytes.length >= MAGIC.length && MAGIC.every((b, i) => bytes[i] === b)

/** Read a quantized model file's bytes; every inconsistency is a QModelFileError that says what is wrong. */
export const decodeQModel = (bytes: Uint8Array, where = "quantized model"): { qm: QModel; info: QModelInfo; header: QModelHeader } => {
  const fail = (why: string): never => {
    throw new QModelFileError({ where, message: `${where}: ${why}` })
  }
  assertLittleEndian(where)
  if (bytes.length < PREFIX) fail(`only ${bytes.length} bytes: truncated (a quantized model file starts with a ${PREFIX}-byte prefix)`)
  if (!hasQModelMagic(bytes)) {
    const head = new TextDecoder("latin1").decode(bytes.subarray(0, 8))
    fail(head === CKPT_MAGIC ? "this is a Flotilla checkpoint, not a quantized model file (run flotilla quantize on it first)" : `bad magic ${JSON.stringify(head)}: not a Flotilla quantized model file (expected "${QMODEL_MAGIC}", written by flotilla quantize)`)
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const format = dv.getUint32(8, true)
  if (format !== QMODEL_FORMAT) fail(`unknown format ${format} (this build reads format ${QMODEL_FORMAT})`)
  const H = dv.getUint32(12, true)
  if (PREFIX + H > bytes.length) fail(`the header (${H} bytes) runs past the end of the file (${bytes.length} bytes): truncated`)
  const hbytes = bytes.subarray(PREFIX, PREFIX + H)
  if (crc32(hbytes) !== dv.getUint32(16, true)) fail("header CRC32 mismatch: the file is corrupt")
  let json: unknown
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(hbytes))
  } catch (e) {
    fail(`the header is not JSON (${(e as Error).message})`)
  }
  const h = decodeValue(Header, where, json)
  if (Result.isFailure(h)) fail(`bad header: ${h.failure.reason}`)
  const header = Result.getOrThrow(h)
  // a copy: 4-aligned (the typed views below need it) and independent of the source buffer
  const payload = Uint8Array.prototype.slice.call(bytes, PREFIX + H) as Uint8Array
  if (payload.length !== header.payloadBytes) fail(`the payload is ${payload.length} bytes, the header says ${header.payloadBytes}${payload.length < header.payloadBytes ? " (truncated)" : " (trailing bytes)"}`)
  if (crc32(payload) !== header.payloadCrc32) fail("payload CRC32 mismatch: the file is corrupt")
  let def: ReturnType<typeof makeModel>
  try {
    def = makeModel(header.model)
  } catch (e) {
    return fail(`model: ${(e as Error).message}`)
  }
  const byName = new Map(header.tensors.map((e) => [e.name, e]))
  if (byName.size !== header.tensors.length) fail("a tensor is listed twice")
  const extra = header.tensors.filter((e) => !def.specs.some((s) => s.name === e.name)).map((e) => e.name)
  if (extra.length > 0) fail(`tensors the ${def.kind} model has not: ${extra.join(", ")}`)
  const wantDtype = header.mode === "int4-weight" ? "int4" : "int8"
  const tensors = new Map<string, QTensor>()
  for (const s of def.specs) {
    const e = byName.get(s.name) ?? fail(`the model's tensor "${s.name}" is missing`)
    const bad = (why: string): never => fail(`tensor "${s.name}": ${why}`)
    if (e.shape.length !== s.shape.length || e.shape.some((d, i) => d !== s.shape[i])) bad(`shape [${e.shape}], the model says [${s.shape}]`)
    const n = sizeOf(s.shape)
    if (e.dtype !== "float32" && e.dtype !== wantDtype) bad(`dtype ${e.dtype} in a ${header.mode} file`)
    if (e.offset % 4 !== 0 || e.offset + e.bytes > payload.length) bad(`values at ${e.offset}+${e.bytes} are unaligned or outside the ${payload.length}-byte payload`)
    if (e.bytes !== dataBytes(e.dtype, n)) bad(`${e.bytes} bytes, ${n} ${e.dtype} values take ${dataBytes(e.dtype, n)}`)
    if (e.dtype === "float32") {
      tensors.set(s.name, { name: s.name, shape: s.shape, dtype: "float32", data: new Float32Array(payload.buffer, e.offset, n) })
      continue
    }
    if (s.shape.length !== 2 || e.layout === undefined || e.group === undefined || e.scalesOffset === undefined || e.scales === undefined) bad("a quantized tensor needs a 2-D shape, layout, group, scalesOffset and scales")
    const want = scaleCount(s.shape, e.layout!, e.group!)
    if (e.scales !== want) bad(`${e.scales} scales, layout ${e.layout} with group ${e.group} needs ${want}`)
    if (e.scalesOffset! % 4 !== 0 || e.scalesOffset! + 4 * want > payload.length) bad(`scales at ${e.scalesOffset} are unaligned or outside the payload`)
    const scales = new Float32Array(payload.buffer, e.scalesOffset!, want)
    if (scales.some((x) => !(Number.isFinite(x) && x >= 0))) bad("a scale is negative or not finite")
    const data = e.dtype === "int8" ? new Int8Array(payload.buffer, e.offset, n) : new Uint8Array(payload.buffer, e.offset, e.bytes)
    tensors.set(s.name, { name: s.name, shape: s.shape, dtype: e.dtype, layout: e.layout, group: e.group, data, scales })
  }
  const qm: QModel = { def, model: header.model, mode: header.mode, tensors, ...(header.activations ? { activations: header.activations } : {}) }
  if (header.mode === "int8-static") {
    const missing = activationSites(qm).filter((site) => header.activations?.[site] === undefined)
    if (missing.length > 0) fail(`int8-static without calibrated ranges for ${missing.join(", ")}`)
  }
  return { qm, header, info: { job: header.job, version: header.version, source: header.source, data: header.data, groupSize: header.groupSize } }
}

/** Whether `path` is a file that starts with the quantized model magic (false for folders and unreadable paths). */
export const isQModelFile = (path: string): boolean => {
  try {
    if (!statSync(path).isFile()) return false
    const fd = openSync(path, "r")
    try {
      const head = new Uint8Array(MAGIC.length)
      return readSync(fd, head, 0, head.length, 0) === head.length && hasQModelMagic(head)
    } finally {
      closeSync(fd)
    }
  } catch {
    return false
  }
}

/** Read and check a quantized model file. */
export const readQModelFile = (path: string): ReturnType<typeof decodeQModel> => {
  let bytes: Uint8Array
  try {
    bytes = new Uint8Array(readFileSync(path))
  } catch (e) {
    throw new QModelFileError({ where: path, message: `${path}: ${(e as Error).message}` })
  }
  return decodeQModel(bytes, path)
}
